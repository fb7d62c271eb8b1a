//! `--template`'s value and template names (also compiled into the fuzz targets, with
//! monitor.json's parser).

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// `--template`: `off`, `auto`, or the name of a template made with `template create --name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Off,
    Auto,
    Named(String),
}

impl Mode {
    pub fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim) {
            None | Some("off") => Ok(Self::Off),
            Some("auto") => Ok(Self::Auto),
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
