# Several disks: a chained (copy-on-write) root disk, an empty data disk, a
# disk from an existing pool volume and a read-only ISO as a CD-ROM.
job "disks" {
  datacenters = ["dc1"]

  group "vm" {
    task "vm" {
      driver = "virt"

      config {
        disk {
          primary = true
          chained = true

          source {
            image = "debian-12-genericcloud-amd64.qcow2"
          }
        }

        disk {
          size     = "20GB"
          bus_type = "virtio"
          format   = "qcow2"
        }

        disk {
          pool = "local"

          source {
            volume = "shared-data"
          }
        }

        disk {
          kind      = "cdrom"
          bus_type  = "sata"
          read_only = true

          source {
            image = "tools.iso"
            format = "raw"
          }
        }
      }

      resources {
        memory = 1024
      }
    }
  }
}
