//! Restore of an ESXi VM (being written).
use std::io::Write;
use super::Ctx;
use crate::error::Result;
pub(super) fn restore(_ctx: &Ctx, _out: &mut dyn Write) -> Result<()> {
    bail!("ESXi restore is not implemented yet")
}
