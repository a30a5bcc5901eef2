//! BasePlugin: identity, plugin config schema and SetConfig.

use tonic::{Request, Response, Status};

use super::{ClientPortRange, Driver, PLUGIN_API_VERSION, PLUGIN_NAME, PLUGIN_VERSION};
use crate::config::plugin::{self, PluginConfig};
use crate::pb::hashicorp::nomad::plugins::base::proto::base_plugin_server::BasePlugin;
use crate::pb::hashicorp::nomad::plugins::base::proto::{
    ConfigSchemaRequest, ConfigSchemaResponse, PluginInfoRequest, PluginInfoResponse, PluginType,
    SetConfigRequest, SetConfigResponse,
};

#[tonic::async_trait]
impl BasePlugin for Driver {
    async fn plugin_info(
        &self,
        _request: Request<PluginInfoRequest>,
    ) -> Result<Response<PluginInfoResponse>, Status> {
        Ok(Response::new(PluginInfoResponse {
            r#type: PluginType::Driver as i32,
            plugin_api_versions: vec![PLUGIN_API_VERSION.to_string()],
            plugin_version: PLUGIN_VERSION.to_string(),
            name: PLUGIN_NAME.to_string(),
        }))
    }

    async fn config_schema(
        &self,
        _request: Request<ConfigSchemaRequest>,
    ) -> Result<Response<ConfigSchemaResponse>, Status> {
        Ok(Response::new(ConfigSchemaResponse {
            spec: Some((&plugin::schema()).into()),
        }))
    }

    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let request = request.into_inner();
        let config: PluginConfig =
            crate::config::decode_msgpack("plugin config", &request.msgpack_config)
                .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let settings = config
            .validate()
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let dispensed = request.nomad_config.is_some();
        if let Some(driver) = request.nomad_config.and_then(|nomad| nomad.driver) {
            if let Ok(mut range) = self.port_range.write() {
                *range = Some(ClientPortRange {
                    min: driver.client_min_port,
                    max: driver.client_max_port,
                });
            }
        }
        tracing::info!(
            uri = %settings.libvirt_uri,
            pools = settings.pools.len(),
            default_pool = %settings.default_pool,
            api_version = %request.plugin_api_version,
            "plugin configured"
        );
        self.apply_settings(settings);
        if dispensed {
            // Only the long-lived instance Nomad dispenses gets nomad_config
            // (older clients never call Driver.Init): prepare the host here.
            self.tasks()
                .init_host(super::service::reconcile_delay(), self.pool_names());
        }
        Ok(Response::new(SetConfigResponse {}))
    }
}
