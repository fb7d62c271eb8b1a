//! Container ids, validated as runc does: they become directory names under `--root`.

pub const MAX_LEN: usize = 1024;

pub fn validate(id: &str) -> anyhow::Result<()> {
    if id.is_empty() {
        anyhow::bail!("invalid container id: it is empty");
    }
    if id.len() > MAX_LEN {
        anyhow::bail!("invalid container id: longer than {MAX_LEN} bytes");
    }
    if id == "." || id == ".." {
        anyhow::bail!("invalid container id {id:?}");
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        anyhow::bail!(
            "invalid container id {id:?}: {bad:?} is not allowed (use letters, digits, _ + - .)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runc_ids_and_rejects_paths() {
        for ok in ["a", "my-container_1.2+x", "0123456789abcdef"] {
            validate(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(MAX_LEN + 1),
        ] {
            assert!(validate(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
