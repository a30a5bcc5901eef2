# Nomad client agent configuration that loads the virt driver.
# Copy the nomad-driver-virt binary into plugin_dir; the plugin block's label
# must equal the binary's file name.

plugin_dir = "/opt/nomad/plugins"

plugin "nomad-driver-virt" {
  config {
    provider {
      libvirt {
        uri = "qemu:///system"
      }
    }

    # Task disks may only use images below these directories (or the alloc
    # and task dirs).
    image_paths = ["/var/lib/nomad-driver-virt/images"]

    storage_pools {
      default = "local"

      directory "local" {
        path = "/var/lib/nomad-driver-virt/pools/local"
      }
    }

    # "auto" uses KVM when /dev/kvm works, else TCG software emulation.
    accelerator = "auto"
    log_level   = "info"
  }
}
