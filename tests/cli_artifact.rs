//! `run`'s artifact and template handling, against a real HTTP server on
//! 127.0.0.1 that the test starts: checksums (each go-getter type), `mode =
//! "file"`, archives unpacked (and hostile ones refused), the job file's
//! blocks wired through `run` so a bad artifact stops it before anything is
//! created, and, on a prepared host, the Go README's example shape end to
//! end: the image fetched over HTTP, a template rendered with the task's
//! environment, both seen by the guest.
//!
//! Everything the tests create is named "ndvtest".

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::Digest;
use nomad_driver_virt::cli::artifact::{self, ArtifactError};
use nomad_driver_virt::cli::job::ArtifactSpec;

/// What the server serves: a path's bytes, or a file streamed from disk.
#[derive(Clone)]
enum Content {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// A tiny HTTP/1.1 server on 127.0.0.1: GET only, one request per
/// connection, at most `MAX_CONNECTIONS` connections, then it stops.
struct Server {
    base: String,
}

const MAX_CONNECTIONS: usize = 64;

impl Server {
    fn start(files: HashMap<String, Content>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming().take(MAX_CONNECTIONS) {
                let Ok(stream) = stream else { continue };
                let files = files.clone();
                std::thread::spawn(move || serve(stream, &files));
            }
        });
        Server { base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

fn serve(stream: TcpStream, files: &HashMap<String, Content>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(stream) => stream,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut stream = stream;
    match files.get(&path) {
        Some(content) => {
            let (length, mut body): (u64, Box<dyn Read>) = match content {
                Content::Bytes(bytes) => (
                    bytes.len() as u64,
                    Box::new(std::io::Cursor::new(bytes.clone())),
                ),
                Content::File(file) => {
                    let opened = std::fs::File::open(file).expect("open served file");
                    let length = opened.metadata().expect("metadata").len();
                    (length, Box::new(opened))
                }
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            );
            let _ = std::io::copy(&mut body, &mut stream);
        }
        None => {
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    }
    let _ = stream.flush();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string(text: &str) -> hcl::Expression {
    hcl::Expression::String(text.to_string())
}

fn spec(
    source: &str,
    destination: &str,
    mode: Option<&str>,
    options: &[(&str, &str)],
) -> ArtifactSpec {
    ArtifactSpec {
        source: Some(string(source)),
        destination: Some(string(destination)),
        mode: mode.map(string),
        options: options
            .iter()
            .map(|(key, value)| (key.to_string(), string(value)))
            .collect(),
        line: 1,
    }
}

fn place(spec: &ArtifactSpec, task_dir: &Path) -> Result<PathBuf, ArtifactError> {
    let artifact = artifact::resolve(spec, &BTreeMap::new(), Path::new("/"))?;
    artifact::place(&artifact, task_dir)
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // Written raw, so a hostile name is kept as it is.
        let field = &mut header.as_old_mut().name;
        field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("tar").finish().expect("gzip")
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        writer
            .start_file(*name, zip::write::SimpleFileOptions::default())
            .expect("zip entry");
        writer.write_all(data).expect("zip data");
    }
    writer.finish().expect("zip").into_inner()
}

#[test]
fn http_artifacts_are_fetched_verified_and_unpacked() {
    let image = b"not really a disk image".to_vec();
    let site = tar_gz(&[("www/index.html", b"<h1>hi</h1>"), ("www/app.js", b"x")]);
    let zipped = zip_of(&[("conf/app.conf", b"port = 80\n")]);
    let escaping = tar_gz(&[("../../escaped", b"owned")]);
    let server = Server::start(HashMap::from([
        ("img/guest.img".to_string(), Content::Bytes(image.clone())),
        ("site.tar.gz".to_string(), Content::Bytes(site)),
        ("conf.zip".to_string(), Content::Bytes(zipped)),
        ("evil.tgz".to_string(), Content::Bytes(escaping)),
    ]));
    let dir = tempfile::Builder::new()
        .prefix("ndvtest-artifact-")
        .tempdir()
        .expect("tempdir");
    let task_dir = dir.path().join("task");
    std::fs::create_dir_all(&task_dir).expect("mkdir");

    // mode = "file" with each checksum type go-getter knows.
    for (kind, sum) in [
        ("md5", hex(&md5::Md5::digest(&image))),
        ("sha1", hex(&sha1::Sha1::digest(&image))),
        ("sha256", hex(&sha2::Sha256::digest(&image))),
        ("sha512", hex(&sha2::Sha512::digest(&image))),
    ] {
        let destination = format!("local/{kind}/focal.img");
        let placed = place(
            &spec(
                &server.url("img/guest.img"),
                &destination,
                Some("file"),
                &[("checksum", &format!("{kind}:{sum}"))],
            ),
            &task_dir,
        )
        .unwrap_or_else(|error| panic!("{kind}: {error:#}"));
        assert_eq!(placed, task_dir.join(&destination));
        assert_eq!(std::fs::read(&placed).expect("read"), image);
    }

    // A wrong checksum leaves nothing behind.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let error = place(
        &spec(
            &server.url("img/guest.img"),
            "local/bad.img",
            Some("file"),
            &[("checksum", &wrong)],
        ),
        &task_dir,
    )
    .expect_err("wrong checksum");
    assert!(
        error
            .to_string()
            .contains("checksum mismatch: expected sha256:000"),
        "{error}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(task_dir.join("local"))
        .expect("read local")
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| {
            !["md5", "sha1", "sha256", "sha512"]
                .iter()
                .any(|k| name == *k)
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // The checksum may also come in the URL's query, as go-getter takes it.
    let in_query = format!(
        "{}?checksum=sha256:{}",
        server.url("img/guest.img"),
        hex(&sha2::Sha256::digest(&image))
    );
    let placed = place(&spec(&in_query, "local/q", None, &[]), &task_dir).expect("query checksum");
    assert_eq!(placed, task_dir.join("local/q/guest.img"));

    // Archives are unpacked into the destination directory.
    place(
        &spec(&server.url("site.tar.gz"), "local/site", None, &[]),
        &task_dir,
    )
    .expect("tar.gz");
    assert_eq!(
        std::fs::read_to_string(task_dir.join("local/site/www/index.html")).expect("read"),
        "<h1>hi</h1>"
    );
    place(
        &spec(&server.url("conf.zip"), "local", None, &[]),
        &task_dir,
    )
    .expect("zip");
    assert_eq!(
        std::fs::read_to_string(task_dir.join("local/conf/app.conf")).expect("read"),
        "port = 80\n"
    );
    // archive = false keeps the archive as it is.
    place(
        &spec(
            &server.url("site.tar.gz"),
            "local/raw",
            None,
            &[("archive", "false")],
        ),
        &task_dir,
    )
    .expect("kept");
    assert!(task_dir.join("local/raw/site.tar.gz").is_file());

    // Hostile archives, missing files and escaping destinations are refused.
    let error = place(
        &spec(&server.url("evil.tgz"), "local/evil", None, &[]),
        &task_dir,
    )
    .expect_err("escaping entry");
    assert!(format!("{error:#}").contains("cannot unpack it"), "{error}");
    assert!(!dir.path().join("escaped").exists());
    assert!(!task_dir.join("escaped").exists());
    let error = place(
        &spec(&server.url("missing.img"), "local", None, &[]),
        &task_dir,
    )
    .expect_err("404");
    assert!(
        error.to_string().contains("the server answered 404"),
        "{error}"
    );
    if cfg!(feature = "https") {
        // HTTPS is built in: a plain-HTTP server fails the TLS handshake.
        let https = server
            .url("img/guest.img")
            .replacen("http://", "https://", 1);
        let error = place(&spec(&https, "local/tls", None, &[]), &task_dir).expect_err("no TLS");
        assert!(matches!(error, ArtifactError::Download { .. }), "{error}");
    }
    let error = place(
        &spec(&server.url("img/guest.img"), "../../x", None, &[]),
        &task_dir,
    )
    .expect_err("outside");
    assert!(
        error.to_string().contains("leaves the task directory"),
        "{error}"
    );
}

/// `run` fetches before it starts anything, and a failed fetch ends the run
/// with the reason and removes the allocation directory it made.
#[test]
fn run_stops_on_a_bad_artifact_and_removes_its_alloc_dir() {
    let server = Server::start(HashMap::from([(
        "guest.qcow2".to_string(),
        Content::Bytes(b"bytes".to_vec()),
    )]));
    let dir = tempfile::Builder::new()
        .prefix("ndvtest-artifact-run-")
        .tempdir()
        .expect("tempdir");
    let job = format!(
        r#"job "ndvtest-artifact" {{
  group "g" {{
    task "ndvtest-artifact" {{
      driver = "virt"

      artifact {{
        source      = "{}"
        destination = "local/guest.qcow2"
        mode        = "file"
        options {{
          checksum = "sha256:{}"
        }}
      }}

      template {{
        data        = "task {{{{ env \"NOMAD_TASK_NAME\" }}}}"
        destination = "local/index.html"
      }}

      config {{
        disk {{
          source {{
            image = "local/guest.qcow2"
          }}
        }}
      }}
    }}
  }}
}}
"#,
        server.url("guest.qcow2"),
        "1".repeat(64)
    );
    let path = dir.path().join("job.nomad.hcl");
    std::fs::write(&path, &job).expect("write job");
    let state_dir = dir.path().join("state");
    let output = Command::new(common::plugin_binary())
        .arg("run")
        .arg(&path)
        .arg("--state-dir")
        .arg(&state_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(&state_dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "alloc dirs left: {leftovers:?}");

    // A template that needs Consul is refused before anything is created.
    let consul = job.replace(
        "task {{ env \\\"NOMAD_TASK_NAME\\\" }}",
        "{{ key \\\"app/config\\\" }}",
    );
    assert_ne!(consul, job);
    std::fs::write(&path, &consul).expect("write job");
    let output = Command::new(common::plugin_binary())
        .arg("run")
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state2"))
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("template: function \"key\" needs Consul"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("state2").exists(),
        "nothing may be created"
    );
}

/// On a prepared host: the Go README's example shape, run as written with
/// the image URL pointing at this test's server. The test guest's disk
/// arrives over HTTP with its checksum, a template renders the page with
/// the task's environment, and the guest serves what it finds in /local.
#[test]
fn go_readme_shape_runs_with_an_http_image_and_a_template() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let guest = common::vm::guest_dir().join("guest.qcow2");
    let image = std::fs::read(&guest).expect("read the test guest");
    let sum = hex(&sha2::Sha256::digest(&image));
    drop(image);
    let server = Server::start(HashMap::from([(
        "guest.qcow2".to_string(),
        Content::File(guest),
    )]));
    let dir = tempfile::Builder::new()
        .prefix("ndvtest-artifact-e2e-")
        .tempdir()
        .expect("tempdir");
    // QEMU (libvirt-qemu) must reach the pool and alloc dirs below it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let pool = common::vm::unique("ndvtest-art-pool-");
    std::fs::create_dir_all(dir.path().join("pool")).expect("mkdir pool");
    let client = dir.path().join("client.hcl");
    std::fs::write(
        &client,
        format!(
            "plugin \"nomad-driver-virt\" {{\n  config {{\n    accelerator = \"tcg\"\n    storage_pools {{\n      directory \"{pool}\" {{\n        path = \"{}\"\n      }}\n    }}\n  }}\n}}\n",
            dir.path().join("pool").display()
        ),
    )
    .expect("write client config");
    let name = "ndvtest-artifact-e2e";
    let job = format!(
        r#"job "ndvtest-artifact-e2e" {{
  group "g" {{
    network {{
      port "http" {{
        to = 8080
      }}
    }}

    task "{name}" {{
      template {{
        data        = <<EOH
<pre>{{{{ env "NOMAD_TASK_NAME" }}}} \o/</pre>
        EOH
        destination = "local/index.html"
      }}

      artifact {{
        source      = "{url}"
        destination = "local/guest.qcow2"
        mode        = "file"
        options {{
          checksum = "sha256:{sum}"
        }}
      }}

      driver = "virt"

      config {{
        hostname = "{name}"
        cmds     = ["cp /local/index.html /www/index.html"]

        disk {{
          chained = true
          source {{
            image = "local/guest.qcow2"
          }}
        }}

        network_interface {{
          bridge {{
            name  = "virbr0"
            ports = ["http"]
          }}
        }}
      }}

      resources {{
        memory = 256
      }}
    }}
  }}
}}
"#,
        url = server.url("guest.qcow2"),
    );
    let path = dir.path().join("job.nomad.hcl");
    std::fs::write(&path, job).expect("write job");
    let mut child = Command::new(common::plugin_binary())
        .arg("run")
        .arg(&path)
        .arg("--plugin-config")
        .arg(&client)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let stop = |child: &mut std::process::Child| {
        // SIGINT, as Ctrl-C: the runner stops and removes the VM.
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(90) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut seen = Vec::new();
    let mut host_port = None;
    let start = Instant::now();
    let mut page = None;
    while start.elapsed() < Duration::from_secs(300) && page.is_none() {
        if let Ok(line) = received.recv_timeout(Duration::from_millis(500)) {
            // `    http: http://<host ip>:<port>/ -> guest <ip>:8080`
            if let Some(rest) = line.split("http: http://").nth(1) {
                host_port = rest.split_once("/ -> guest ").map(|(hp, _)| hp.to_string());
            }
            seen.push(line);
        }
        if let Some(address) = host_port
            .as_deref()
            .filter(|_| seen.iter().any(|l| l.contains("is running")))
        {
            page = http_get(address).filter(|body| body.contains("\\o/"));
            if page.is_none() {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
    }
    stop(&mut child);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let _ = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "pool-destroy", &pool])
        .output();
    let _ = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "pool-undefine", &pool])
        .output();
    let page = page.unwrap_or_else(|| {
        panic!(
            "no page from the guest\n--- stdout:\n{}\n--- stderr:\n{stderr}",
            seen.join("\n")
        )
    });
    assert!(page.contains(&format!("<pre>{name} \\o/</pre>")), "{page}");
    assert!(
        seen.iter()
            .any(|l| l.contains("==> Artifact ") && l.ends_with("local/guest.qcow2")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("==> Template ") && l.ends_with("local/index.html")),
        "{seen:?}"
    );
}

/// One GET over plain HTTP; the body, or None.
fn http_get(address: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}
