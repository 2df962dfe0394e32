# ambassadord as a Nomad system job: one allocation on every eligible client node.
#
#   nomad job run -var image=registry.example.com/ambassadord:0.1.0 deploy/ambassadord.nomad.hcl
#
# Each client's Docker plugin must allow the capabilities (they are not in Nomad's default
# allow_caps); in the client configuration:
#
#   plugin "docker" {
#     config {
#       allow_caps = ["audit_write", "chown", "dac_override", "fowner", "fsetid", "kill", "mknod",
#                     "net_bind_service", "setfcap", "setgid", "setpcap", "setuid", "sys_chroot",
#                     "net_admin", "bpf"]
#     }
#   }
#
# (add "net_raw" too for an image built with IPTABLES_BACKEND=legacy). "bpf" is for the
# kernel relay and is optional: without it in cap_add the daemon relays in user space,
# slower. On Docker < 23.0 or Linux < 5.8, Docker refuses a task with BPF: remove it from
# cap_add there. deploy/README.md has the rest: the routes template, reloads, and stopping.

variable "image" {
  type        = string
  default     = "ambassadord:latest"
  description = "The image built from docker/Dockerfile, in a registry the clients can pull from."
}

job "ambassadord" {
  type        = "system"
  datacenters = ["*"]
  # A host's ambassador is infrastructure: keep it ahead of ordinary jobs.
  priority = 90

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "ambassadord" {
    # The host's network namespace: the daemon sees the host's connections and installs
    # the host's nat rules.
    network {
      mode = "host"
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "ambassadord" {
      driver = "docker"

      config {
        image        = var.image
        network_mode = "host"
        # NET_ADMIN: iptables and SO_MARK. BPF: the kernel relay (optional, see above).
        cap_add      = ["NET_ADMIN", "BPF"]
        # After the image's entrypoint, `ambassadord run`.
        args = [
          "--iptables",
          "--config", "/local/routes.toml",
          "--log-format", "json",
        ]
      }

      env {
        # The node's Consul agent, for consul:// routes.
        CONSUL_HTTP_ADDR = "127.0.0.1:8500"
      }

      # The routes. On a change Nomad sends SIGHUP, and the daemon reloads them without a
      # restart (open connections are not touched).
      template {
        destination   = "local/routes.toml"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOF
          # `ambassadord check --config routes.toml` validates this file.
          [routes]
          # The passing instances of the Consul service "redis", watched through the local agent.
          6379 = "consul:///redis"
        EOF
      }

      # SIGTERM: the daemon removes its nat rules, then lets open connections finish within
      # --grace (10 s). Nomad's default kill_timeout (5 s) would cut that short.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu        = 200
        memory     = 128
        memory_max = 256
      }
    }
  }
}
