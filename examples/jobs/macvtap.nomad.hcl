# A VM on the host's LAN through macvtap: it gets an address from the LAN's
# DHCP server; no port mapping is involved.
job "macvtap" {
  datacenters = ["dc1"]

  group "vm" {
    task "vm" {
      driver = "virt"

      config {
        disk {
          chained = true

          source {
            image = "debian-12-genericcloud-amd64.qcow2"
          }
        }

        network_interface {
          macvtap {
            device = "eth0"
            mode   = "bridge"
          }
        }
      }

      resources {
        memory = 1024
      }
    }
  }
}
