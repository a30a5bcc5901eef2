//! The plugin's block in a Nomad client config file,
//! `plugin "nomad-driver-virt" { config { ... } }`: finding it and its config
//! body. One home for `run --plugin-config` and `validate CLIENT.hcl`.

use hcl::edit::structure::{Block, Body};
use hcl::edit::Span as _;

/// The plugin block label Nomad matches against the binary's file name.
pub const PLUGIN_BLOCK_LABEL: &str = "nomad-driver-virt";

/// Why a client config has no usable plugin config.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientConfigError {
    #[error("invalid HCL at line {}, column {}", .0.location().line(), .0.location().column())]
    Hcl(#[source] hcl::edit::parser::Error),
    #[error("has no plugin \"{PLUGIN_BLOCK_LABEL}\" block; add plugin \"{PLUGIN_BLOCK_LABEL}\" {{ config {{ ... }} }} (Nomad matches the label against the binary's file name)")]
    NoPluginBlock,
    #[error("plugin \"{PLUGIN_BLOCK_LABEL}\" has more than one config block")]
    SeveralConfigBlocks,
}

/// Parses a client config file's HCL.
pub fn parse(source: &str) -> Result<Body, ClientConfigError> {
    hcl::edit::parser::parse_body(source).map_err(ClientConfigError::Hcl)
}

/// A file that configures plugins and declares no job: a client config.
pub fn is_client_config(body: &Body) -> bool {
    !body.has_blocks("job") && body.has_blocks("plugin")
}

/// The `config` block of our plugin block; `None` when the plugin block has
/// none (the plugin's defaults).
pub fn plugin_config_block(body: &Body) -> Result<Option<&Block>, ClientConfigError> {
    let plugin = body
        .get_blocks("plugin")
        .find(|block| {
            block
                .labels
                .first()
                .is_some_and(|label| label.as_str() == PLUGIN_BLOCK_LABEL)
        })
        .ok_or(ClientConfigError::NoPluginBlock)?;
    let mut configs = plugin.body.get_blocks("config");
    let config = configs.next();
    if configs.next().is_some() {
        return Err(ClientConfigError::SeveralConfigBlocks);
    }
    Ok(config)
}

/// The text of our plugin's `config` block body in a client config file;
/// empty when the block has no config (the plugin's defaults).
pub fn plugin_config_body(source: &str) -> Result<String, ClientConfigError> {
    let body = parse(source)?;
    Ok(plugin_config_block(&body)?
        .map(|config| block_inner_text(source, config))
        .unwrap_or_default())
}

/// The source text between a block's braces, or the block body re-rendered
/// when the block has no span.
pub fn block_inner_text(source: &str, block: &Block) -> String {
    block
        .span()
        .and_then(|span| source.get(span))
        .and_then(|text| {
            let open = text.find('{')?;
            let close = text.rfind('}')?;
            text.get(open + 1..close)
        })
        .map_or_else(
            || hcl::to_string(&hcl::Body::from(block.body.clone())).unwrap_or_default(),
            str::to_string,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_plugin_config_body() {
        let source = "plugin_dir = \"/p\"\nplugin \"other\" {\n  config {\n    x = 1\n  }\n}\nplugin \"nomad-driver-virt\" {\n  config {\n    accelerator = \"tcg\"\n  }\n}\n";
        let body = plugin_config_body(source).expect("found");
        assert_eq!(body.trim(), "accelerator = \"tcg\"");
        assert!(is_client_config(&parse(source).expect("hcl")));
    }

    #[test]
    fn a_plugin_block_without_config_means_defaults() {
        assert_eq!(
            plugin_config_body("plugin \"nomad-driver-virt\" {}\n").expect("defaults"),
            ""
        );
    }

    #[test]
    fn problems_are_typed() {
        assert!(matches!(
            plugin_config_body("plugin \"virt\" {}\n"),
            Err(ClientConfigError::NoPluginBlock)
        ));
        assert!(matches!(
            plugin_config_body("plugin \"nomad-driver-virt\" {\n  config {}\n  config {}\n}\n"),
            Err(ClientConfigError::SeveralConfigBlocks)
        ));
        let Err(error @ ClientConfigError::Hcl(_)) = plugin_config_body("plugin {") else {
            panic!("not an HCL error");
        };
        assert!(
            error.to_string().starts_with("invalid HCL at line 1"),
            "{error}"
        );
        assert!(std::error::Error::source(&error).is_some());
    }
}
