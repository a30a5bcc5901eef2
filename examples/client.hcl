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

    # What jobs may touch (README, Security model). Unset, jobs may join
    # every libvirt network, use macvtap on the default-route devices in
    # bridge/private/vepa mode, use every pool above, and have disks up to
    # the pool's free space; guests on libvirt networks get clean-traffic.
    # allow_networks        = ["default"]
    # allow_macvtap_devices = ["eth0"]
    # allow_macvtap_modes   = ["bridge"]
    # allow_storage_pools   = ["local"]
    # max_disk_size         = "100GiB"
    # clean_traffic         = true
  }
}
