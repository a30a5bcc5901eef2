# The quickstart job: boots the tiny test guest (tests/setup/guest.sh builds
# it into /var/lib/nomad-driver-virt-test) and serves a page on port 8080,
# mapped from the host's port 8080:
#
#   nomad-driver-virt run examples/jobs/hello.nomad.hcl \
#     --plugin-config examples/quickstart-client.hcl
#   curl http://<host ip>:8080/
job "hello" {
  datacenters = ["dc1"]

  group "hello" {
    network {
      port "http" {
        static = 8080
        to     = 8080
      }
    }

    task "hello" {
      driver = "virt"

      config {
        hostname = "hello-vm"

        # The guest's web server serves /www on port 8080.
        cmds = [
          "echo \"<h1>Hello from $(hostname), a Nomad VM</h1>\" > /www/index.html",
        ]

        disk {
          chained = true

          source {
            image = "guest.qcow2"
          }
        }

        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["http"]
          }
        }
      }

      resources {
        cpu    = 500
        memory = 256
      }

      kill_timeout = "10s"
    }
  }
}
