# Plugin configuration for the quickstart (examples/quickstart.sh): software
# emulation (works without /dev/kvm, e.g. inside a cloud VM), the test
# guest's directory as the image path, and a storage pool of its own.
# `nomad-driver-virt run --plugin-config` reads the plugin block of a Nomad
# client config, so this file also works as one.

plugin "nomad-driver-virt" {
  config {
    provider {
      libvirt {
        uri = "qemu:///system"
      }
    }

    image_paths = ["/var/lib/nomad-driver-virt-test"]

    storage_pools {
      directory "quickstart" {
        path = "/var/lib/nomad-driver-virt/pools/quickstart"
      }
    }

    # "auto" would pick KVM where /dev/kvm works; TCG runs everywhere.
    accelerator = "tcg"
  }
}
