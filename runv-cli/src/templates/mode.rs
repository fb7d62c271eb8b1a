//! `--template`'s value and template names (also compiled into the fuzz targets, with
//! monitor.json's parser).

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// `--template`: `auto` (the default), `off`, or the name of a template made with
/// `template create --name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `Default` is what a monitor.json written before templates existed means, not the
    /// command line's default (`parse(None)`).
    #[default]
    Off,
    Auto,
    Named(String),
}

impl Mode {
    pub fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim) {
            Some("off") => Ok(Self::Off),
            None | Some("auto") => Ok(Self::Auto),
            Some("") => bail!("invalid --template \"\": want auto, off or a template name"),
            Some(name) => {
                validate_name(name)?;
                Ok(Self::Named(name.to_string()))
            }
        }
    }
}

pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        bail!("invalid template name {name:?}: use up to 64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}
