//! Signal names as runc takes them: `TERM`, `SIGTERM`, `term`, or a number.

use std::str::FromStr;

use anyhow::bail;
use nix::sys::signal::Signal;

pub fn parse(text: &str) -> anyhow::Result<i32> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal number {n}");
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&name) {
        Ok(sig) => Ok(sig as i32),
        Err(_) => bail!("unknown signal {text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM").unwrap(), 15);
        assert_eq!(parse("SIGKILL").unwrap(), 9);
        assert_eq!(parse("hup").unwrap(), 1);
        assert_eq!(parse("9").unwrap(), 9);
        assert!(parse("0").is_err());
        assert!(parse("NOPE").is_err());
    }
}
