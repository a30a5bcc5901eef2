//! A Nomad-client simulator: starts the plugin binary exactly as Nomad's
//! client does (go-plugin), validates its handshake, dials it, and encodes
//! HCL against the plugin's advertised schema the way Nomad does. Tests and
//! the `run` command use it, so both go through the real wire path.

pub mod handshake;
pub mod hcldec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::nomad::hclspec::Spec;
use crate::pb::hashicorp::nomad::plugins::base::proto::base_plugin_client::BasePluginClient;
use crate::pb::hashicorp::nomad::plugins::base::proto::{
    ConfigSchemaRequest, NomadConfig, SetConfigRequest,
};
use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_client::DriverClient;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::TaskConfigSchemaRequest;
use crate::pb::plugin::grpc_broker_client::GrpcBrokerClient;
use crate::pb::plugin::grpc_controller_client::GrpcControllerClient;
use crate::pb::plugin::grpc_stdio_client::GrpcStdioClient;
use crate::plugin::handshake::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};

pub use handshake::{parse_handshake, Handshake, HandshakeError};

/// How long Nomad (go-plugin) waits for the handshake line.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long go-plugin's Kill() waits for the process after Shutdown.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How to launch the plugin.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Extra environment (on top of ours and what Nomad adds).
    pub env: Vec<(String, String)>,
    /// Variables to remove from the inherited environment.
    pub env_remove: Vec<String>,
    /// Whether to set the magic cookie (Nomad always does).
    pub cookie: Option<String>,
    /// `PLUGIN_PROTOCOL_VERSIONS`; Nomad offers "2".
    pub protocol_versions: String,
    /// Versions we accept in the handshake; Nomad accepts only 2.
    pub accepted_app_versions: Vec<u32>,
    /// Arguments after the binary (`plugin { args = [...] }`).
    pub args: Vec<String>,
    pub start_timeout: Duration,
    /// Copy the plugin's stderr lines to our stderr as they arrive.
    pub echo_stderr: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            env_remove: Vec::new(),
            cookie: Some(MAGIC_COOKIE_VALUE.to_string()),
            protocol_versions: "2".into(),
            accepted_app_versions: vec![crate::plugin::handshake::APP_PROTOCOL_VERSION],
            args: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            echo_stderr: false,
        }
    }
}

/// A running plugin process and a gRPC channel to it.
pub struct PluginClient {
    child: Child,
    pub handshake: Handshake,
    channel: Channel,
    stdout_extra: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Collects lines from a child pipe in the background.
fn collect_lines<R>(reader: R, sink: Arc<Mutex<Vec<String>>>, echo: bool)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("{line}");
            }
            if let Ok(mut sink) = sink.lock() {
                sink.push(line);
            }
        }
    });
}

impl PluginClient {
    /// Starts `binary` as Nomad does and connects to it.
    pub async fn launch(binary: &Path, options: LaunchOptions) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(&options.args)
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .env("PLUGIN_PROTOCOL_VERSIONS", &options.protocol_versions)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in &options.env_remove {
            command.env_remove(name);
        }
        match &options.cookie {
            Some(cookie) => command.env(MAGIC_COOKIE_KEY, cookie),
            None => command.env_remove(MAGIC_COOKIE_KEY),
        };
        command.envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start plugin {}", binary.display()))?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stderr.take() {
            collect_lines(pipe, stderr.clone(), options.echo_stderr);
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("plugin stdout not captured"))?;
        let mut stdout = BufReader::new(stdout);
        let mut first_line = String::new();
        let read =
            tokio::time::timeout(options.start_timeout, stdout.read_line(&mut first_line)).await;
        match read {
            Err(_) => {
                let _ = child.kill().await;
                bail!("timeout while waiting for plugin to start");
            }
            Ok(Err(error)) => bail!("cannot read the plugin's stdout: {error}"),
            Ok(Ok(0)) => {
                let status = child.wait().await.ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let log = stderr.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("plugin exited before we could connect (status {status:?}); stderr:\n{log}");
            }
            Ok(Ok(_)) => {}
        }
        let handshake = parse_handshake(&first_line, &options.accepted_app_versions)?;
        // go-plugin keeps reading (and discarding) stdout; we keep the lines
        // so tests can prove there are none.
        let stdout_extra = Arc::new(Mutex::new(Vec::new()));
        collect_lines(stdout, stdout_extra.clone(), false);

        let channel = dial(&handshake).await?;
        let client = Self {
            child,
            handshake,
            channel,
            stdout_extra,
            stderr,
        };
        client.open_go_plugin_streams();
        Ok(client)
    }

    /// Nomad's go-plugin client opens these two streams right after connecting.
    fn open_go_plugin_streams(&self) {
        let mut stdio = GrpcStdioClient::new(self.channel.clone());
        tokio::spawn(async move {
            if let Ok(response) = stdio.stream_stdio(()).await {
                let mut stream = response.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
        });
        let mut broker = GrpcBrokerClient::new(self.channel.clone());
        tokio::spawn(async move {
            let outgoing = tokio_stream::pending();
            if let Ok(response) = broker.start_stream(outgoing).await {
                let mut stream = response.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
        });
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn base(&self) -> BasePluginClient<Channel> {
        BasePluginClient::new(self.channel.clone())
    }

    pub fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone()).max_decoding_message_size(i32::MAX as usize)
    }

    pub fn controller(&self) -> GrpcControllerClient<Channel> {
        GrpcControllerClient::new(self.channel.clone())
    }

    /// The plugin's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The socket the plugin announced.
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(&self.handshake.address)
    }

    /// Lines the plugin wrote to stdout after the handshake (should be none).
    pub fn extra_stdout_lines(&self) -> Vec<String> {
        self.stdout_extra
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// Everything the plugin wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// The live stderr line buffer (outlives `kill`).
    pub fn stderr_buffer(&self) -> Arc<Mutex<Vec<String>>> {
        self.stderr.clone()
    }

    /// The plugin config schema it advertises.
    pub async fn plugin_config_schema(&self) -> anyhow::Result<Spec> {
        let response = self
            .base()
            .config_schema(ConfigSchemaRequest {})
            .await?
            .into_inner();
        let spec = response
            .spec
            .ok_or_else(|| anyhow!("plugin advertises no config schema"))?;
        Ok(Spec::try_from(&spec)?)
    }

    /// The task config schema it advertises.
    pub async fn task_config_schema(&self) -> anyhow::Result<Spec> {
        let response = self
            .driver()
            .task_config_schema(TaskConfigSchemaRequest {})
            .await?
            .into_inner();
        let spec = response.spec.ok_or_else(|| anyhow!("nil spec given"))?;
        Ok(Spec::try_from(&spec)?)
    }

    /// Encodes the body of a `plugin { config { ... } }` block as Nomad would
    /// and sends SetConfig.
    pub async fn set_config_hcl(
        &self,
        config_body: &str,
        nomad_config: Option<NomadConfig>,
    ) -> anyhow::Result<()> {
        let spec = self.plugin_config_schema().await?;
        let bytes = hcldec::encode_hcl(&spec, config_body, &hcl::eval::Context::new())?;
        self.base()
            .set_config(SetConfigRequest {
                msgpack_config: bytes,
                nomad_config,
                plugin_api_version: crate::meta::PLUGIN_API_VERSION.into(),
            })
            .await?;
        Ok(())
    }

    /// Encodes a task `config { ... }` body against the advertised task
    /// schema, with the task environment available for interpolation.
    pub async fn encode_task_config(
        &self,
        config_body: &str,
        env: &HashMap<String, String>,
    ) -> anyhow::Result<Vec<u8>> {
        let spec = self.task_config_schema().await?;
        let context = interpolation_context(env);
        Ok(hcldec::encode_hcl(&spec, config_body, &context)?)
    }

    /// What go-plugin's Kill() does: Shutdown, wait up to 2 s, then SIGKILL.
    pub async fn kill(mut self) -> anyhow::Result<ExitStatus> {
        let _ = tokio::time::timeout(
            KILL_GRACE,
            self.controller().shutdown(crate::pb::plugin::Empty {}),
        )
        .await;
        match tokio::time::timeout(KILL_GRACE, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }

    /// Sends a signal to the plugin process.
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("plugin already exited"))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => Ok(None),
        }
    }

    /// Checks whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// HCL variables for task config interpolation: each environment variable
/// by name (`${NOMAD_TASK_NAME}`) and under `env` (`${env.NAME}`).
pub fn interpolation_context(env: &HashMap<String, String>) -> hcl::eval::Context<'static> {
    let mut context = hcl::eval::Context::new();
    let mut env_object = hcl::Map::new();
    for (name, value) in env {
        context.declare_var(name.clone(), hcl::Value::String(value.clone()));
        env_object.insert(name.clone(), hcl::Value::String(value.clone()));
    }
    context.declare_var("env", hcl::Value::Object(env_object));
    context
}

/// Dials the plugin's socket the way go-plugin does (plaintext HTTP/2).
async fn dial(handshake: &Handshake) -> anyhow::Result<Channel> {
    let path = PathBuf::from(&handshake.address);
    let endpoint = Endpoint::try_from("http://[::]:50051")?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("cannot dial the plugin at {}", handshake.address))?;
    Ok(channel)
}
