# A Debian or Ubuntu cloud image with cloud-init: a user, an SSH key,
# commands on first boot and the Nomad environment in /etc/profile.d/virt.sh.
job "debian-vm" {
  datacenters = ["dc1"]

  group "vm" {
    network {
      port "ssh" {
        to = 22
      }
    }

    task "debian" {
      driver = "virt"

      config {
        hostname                        = "debian-vm"
        default_user_password           = "change-me"
        default_user_authorized_ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForDocs user@example"
        timezone                        = "Europe/Berlin"
        cmds                            = ["apt-get update", "apt-get install -y nginx qemu-guest-agent"]

        # `nomad alloc signal -s SIGHUP` reloads nginx in the guest (through
        # the QEMU guest agent, which also serves `nomad alloc exec`).
        guest_agent = true
        signal_commands = {
          SIGHUP = "systemctl reload nginx"
        }

        user_data = <<EOT
#cloud-config
packages:
  - htop
EOT

        os {
          arch    = "x86_64"
          machine = "pc"
        }

        disk {
          primary = true
          chained = true
          size    = "10GiB"

          source {
            image = "debian-12-genericcloud-amd64.qcow2"
          }
        }

        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["ssh"]
          }
        }
      }

      resources {
        cpu    = 2000
        memory = 1024
      }
    }
  }
}
