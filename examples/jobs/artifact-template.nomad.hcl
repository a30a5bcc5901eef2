# The Go driver's README example, shaped for the tiny test guest: the disk
# image arrives as an artifact over HTTP (checked against its checksum) and
# the page is rendered from a template with the task's environment. Serve
# the guest image first, e.g.:
#
#   cd /var/lib/nomad-driver-virt-test && python3 -m http.server 8000 --bind 127.0.0.1
#   sha256sum guest.qcow2    # to check it, uncomment options below
#   nomad-driver-virt run examples/jobs/artifact-template.nomad.hcl \
#     --plugin-config examples/quickstart-client.hcl
job "artifact-template" {
  group "web" {
    network {
      port "http" {
        to = 8080
      }
    }

    task "web" {
      template {
        data        = <<EOH
<pre>
{{ env "NOMAD_TASK_NAME" }} in allocation {{ env "NOMAD_ALLOC_ID" }}
\o/
</pre>
        EOH
        destination = "local/index.html"
        perms       = "644"
      }

      artifact {
        source      = "http://127.0.0.1:8000/guest.qcow2"
        destination = "local/guest.qcow2"
        mode        = "file"

        # options {
        #   checksum = "sha256:<the sha256sum of guest.qcow2>"
        # }
      }

      driver = "virt"

      config {
        # The guest's web server serves /www on port 8080; the task's local/
        # dir is shared into the guest at /local.
        cmds = ["cp /local/index.html /www/index.html"]

        disk {
          chained = true

          source {
            image = "local/guest.qcow2"
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
        memory = 256
      }
    }
  }
}
