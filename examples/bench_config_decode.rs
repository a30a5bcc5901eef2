//! Benchmark: the task config's way through the driver. Nomad turns the job's
//! `config { ... }` block into msgpack (here: the crate's own hcldec
//! encoder, the same bytes Nomad sends) and the driver decodes and validates
//! it on every `ValidateTask`/`StartTask`.
//!
//! ```text
//! cargo run --release --example bench_config_decode -- [--rounds R]
//! ```
//!
//! Machines are noisy, so each round runs every variant once (rotating which
//! goes first), each sample is a timed batch of many operations, and the
//! table reports medians over the rounds plus ratios of those medians.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nomad_driver_virt::config::task::{decode_and_validate, schema, TaskConfig};
use nomad_driver_virt::nomad::hclspec::Spec;
use nomad_driver_virt::nomad_client::hcldec::encode_hcl;

/// A realistic task config: cloud-init settings, four disks of different
/// kinds and a bridged interface with mapped ports.
const BIG_HCL: &str = r#"
hostname                        = "web-frontend-01"
default_user_password           = "change-me"
default_user_authorized_ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForDocs user@example"
timezone                        = "Europe/Berlin"
cmds = [
  "apt-get update",
  "apt-get install -y nginx",
  "systemctl enable --now nginx",
  "mkdir -p /srv/data",
]

user_data = <<EOT
#cloud-config
packages:
  - htop
  - curl
write_files:
  - path: /etc/motd
    content: "managed by nomad-driver-virt"
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

disk {
  size     = "20GB"
  bus_type = "virtio"
  format   = "qcow2"
  sparse   = true
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
    image  = "tools.iso"
    format = "raw"
  }
}

network_interface {
  bridge {
    name  = "virbr0"
    ports = ["http", "https", "ssh"]
  }
}
"#;

/// About the smallest config a job can have.
const TINY_HCL: &str = r#"hostname = "vm""#;

const USAGE: &str = "usage: bench_config_decode [--rounds R]
  --rounds R   measured rounds, variants interleaved (default 21)";

/// Wall time each timed batch aims for: long enough to swamp timer and
/// scheduling noise, short enough for many rounds.
const SAMPLE_TARGET: Duration = Duration::from_millis(40);

fn parse_args() -> Result<Option<usize>> {
    let mut rounds = 21;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => {
                let value = args
                    .next()
                    .with_context(|| format!("--rounds needs a value\n{USAGE}"))?;
                rounds = value
                    .parse()
                    .with_context(|| format!("--rounds {value:?} is not a number\n{USAGE}"))?;
                ensure!((1..=1000).contains(&rounds), "--rounds must be 1..=1000");
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(rounds))
}

/// One measured operation; `run` does it once and returns an error rather
/// than panicking if the input is rejected.
struct Variant<'a> {
    name: &'static str,
    run: Box<dyn Fn() -> Result<()> + 'a>,
    iters: u64,
    samples: Vec<f64>,
}

impl Variant<'_> {
    /// Times `iters` runs; returns ns per op.
    fn sample(&self, iters: u64) -> Result<f64> {
        let start = Instant::now();
        for _ in 0..iters {
            (self.run)()?;
        }
        Ok(start.elapsed().as_nanos() as f64 / iters as f64)
    }

    /// Picks the batch size: doubles until a batch takes a measurable time,
    /// then scales to [`SAMPLE_TARGET`].
    fn calibrate(&mut self) -> Result<()> {
        let mut iters = 1u64;
        loop {
            let start = Instant::now();
            for _ in 0..iters {
                (self.run)()?;
            }
            let elapsed = start.elapsed();
            if elapsed >= Duration::from_millis(5) || iters >= 1 << 30 {
                break;
            }
            iters *= 2;
        }
        // Rescale twice from full-size batches: the first short batches run
        // cold (caches, CPU clock) and overestimate the cost.
        for _ in 0..2 {
            let per_op = self.sample(iters)?;
            iters = ((SAMPLE_TARGET.as_nanos() as f64 / per_op) as u64).max(1);
        }
        self.iters = iters;
        Ok(())
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn encode(spec: &Spec, hcl_src: &str) -> Result<Vec<u8>> {
    encode_hcl(spec, hcl_src, &hcl::eval::Context::new()).map_err(|e| anyhow!("encode: {e}"))
}

fn decode(bytes: &[u8]) -> Result<TaskConfig> {
    decode_and_validate(bytes).map_err(|e| anyhow!("decode: {e}"))
}

fn main() -> Result<()> {
    let Some(rounds) = parse_args()? else {
        return Ok(());
    };
    let spec = schema();
    let big = encode(&spec, BIG_HCL).context("the big config")?;
    let tiny = encode(&spec, TINY_HCL).context("the tiny config")?;

    // Check once that the bytes mean what the benchmark claims, so it cannot
    // silently time an early error path.
    let decoded = decode(&big)?;
    let disks = decoded.disk.as_ref().map_or(0, Vec::len);
    let interfaces = decoded.network_interface.as_ref().map_or(0, Vec::len);
    ensure!(
        disks == 4 && interfaces == 1,
        "big config decoded to {disks} disks and {interfaces} interfaces, expected 4 and 1"
    );
    ensure!(
        decode(&tiny)?.hostname.as_deref() == Some("vm"),
        "tiny config lost its hostname"
    );

    let mut variants = vec![
        Variant {
            name: "decode+validate big",
            run: Box::new(|| decode(black_box(&big)).map(|c| drop(black_box(c)))),
            iters: 0,
            samples: Vec::new(),
        },
        Variant {
            name: "decode+validate tiny",
            run: Box::new(|| decode(black_box(&tiny)).map(|c| drop(black_box(c)))),
            iters: 0,
            samples: Vec::new(),
        },
        Variant {
            name: "encode HCL->msgpack big",
            run: Box::new(|| encode(&spec, black_box(BIG_HCL)).map(|b| drop(black_box(b)))),
            iters: 0,
            samples: Vec::new(),
        },
        Variant {
            name: "encode HCL->msgpack tiny",
            run: Box::new(|| encode(&spec, black_box(TINY_HCL)).map(|b| drop(black_box(b)))),
            iters: 0,
            samples: Vec::new(),
        },
    ];
    for variant in &mut variants {
        variant.calibrate()?;
    }

    for round in 0..rounds {
        // Rotate the starting variant so drift spreads over all of them.
        for offset in 0..variants.len() {
            let index = (round + offset) % variants.len();
            let variant = &mut variants[index];
            let ns = variant.sample(variant.iters)?;
            variant.samples.push(ns);
        }
    }

    println!("task config decode benchmark");
    println!(
        "  big config: {} bytes HCL -> {} bytes msgpack ({disks} disks, {interfaces} interface)",
        BIG_HCL.len(),
        big.len()
    );
    println!(
        "  tiny config: {} bytes HCL -> {} bytes msgpack",
        TINY_HCL.len(),
        tiny.len()
    );
    println!(
        "  {rounds} rounds, each sample a batch of ~{} ms",
        SAMPLE_TARGET.as_millis()
    );
    println!();
    println!(
        "{:<26} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "operation", "ops/batch", "median ns/op", "min ns/op", "max ns/op", "ops/s"
    );
    println!("{}", "-".repeat(89));
    let mut medians = Vec::new();
    for variant in &variants {
        let med = median(&variant.samples);
        let min = variant
            .samples
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = variant.samples.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<26} {:>10} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            variant.name,
            variant.iters,
            med,
            min,
            max,
            1e9 / med
        );
        medians.push(med);
    }
    println!();
    let ratio = |a: usize, b: usize| medians[a] / medians[b];
    println!("decode big / decode tiny:  {:.2}x", ratio(0, 1));
    println!("encode big / encode tiny:  {:.2}x", ratio(2, 3));
    println!("encode big / decode big:   {:.2}x", ratio(2, 0));
    println!("(ratios of the medians over {rounds} rounds)");
    Ok(())
}
