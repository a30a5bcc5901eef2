//! placeholder
use crate::nomad::hclspec::Spec;
#[derive(Debug, thiserror::Error)]
#[error("not yet")]
pub struct HclDecodeError;
pub fn encode_hcl(
    _spec: &Spec,
    _src: &str,
    _ctx: &hcl::eval::Context,
) -> Result<Vec<u8>, HclDecodeError> {
    Err(HclDecodeError)
}
