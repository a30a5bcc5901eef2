# Ports mapped on the host's loopback address: reachable as 127.0.0.1:8080
# from the host only. Needs a client host_network "loopback" with
# cidr = "127.0.0.1/32" and net.ipv4.conf.virbr0.route_localnet=1.
job "loopback" {
  datacenters = ["dc1"]

  group "web" {
    network {
      port "http" {
        static       = 8080
        to           = 8080
        host_network = "loopback"
      }
    }

    task "web" {
      driver = "virt"

      config {
        disk {
          chained = true

          source {
            image = "debian-12-genericcloud-amd64.qcow2"
          }
        }

        cmds = ["python3 -m http.server 8080 --directory /alloc"]

        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["http"]
          }
        }
      }

      resources {
        memory = 512
      }
    }
  }
}
