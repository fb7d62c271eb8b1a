//! `runv drivers`: what was found, what it can do, and whether it can run here.

use serde_json::{Value, json};

use crate::plugins::Registry;
use runv_api::PluginInfo;

/// One row per loaded plugin, probed now.
pub fn rows(registry: &Registry) -> Vec<Value> {
    let hypervisors = registry
        .hypervisors
        .iter()
        .map(|l| row(l.client.info(), &l.file, l.client.probe()));
    let storages = registry
        .storages
        .iter()
        .map(|l| row(l.client.info(), &l.file, l.client.probe()));
    hypervisors.chain(storages).collect()
}

fn row(info: &PluginInfo, file: &std::path::Path, probe: Result<(), String>) -> Value {
    json!({
        "kind": info.kind.as_str(),
        "name": info.name.as_str(),
        "version": info.version.as_str(),
        "description": info.description.as_str(),
        "file": file.display().to_string(),
        "capabilities": info.capabilities.names(),
        "available": probe.is_ok(),
        "reason": probe.err().unwrap_or_default(),
    })
}

/// What `create` would use with the given `--driver` / `--storage`, or why nothing.
fn selection(registry: &Registry, driver: Option<&str>, storage: Option<&str>) -> Value {
    let hypervisor = match registry.choose_hypervisor(driver) {
        Ok(l) => json!({"name": l.client.info().name.as_str()}),
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    let storage = match registry.choose_storage(storage) {
        Ok(Some(l)) => json!({"name": l.client.info().name.as_str()}),
        Ok(None) => json!({"name": null, "note": "the bundle rootfs is shared as is"}),
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    json!({"hypervisor": hypervisor, "storage": storage})
}

pub fn run(
    registry: &Registry,
    format: &str,
    driver: Option<&str>,
    storage: Option<&str>,
) -> anyhow::Result<()> {
    let rows = rows(registry);
    let selected = selection(registry, driver, storage);
    match format {
        "json" => {
            let skipped: Vec<Value> = registry
                .skipped
                .iter()
                .map(|s| json!({"file": s.file.display().to_string(), "reason": s.reason}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"drivers": rows, "skipped": skipped, "selected": selected})
                )?
            );
        }
        "table" => {
            print_table(&rows);
            println!();
            match (
                &selected["hypervisor"]["name"],
                &selected["hypervisor"]["error"],
            ) {
                (Value::String(name), _) => println!("hypervisor used by default: {name}"),
                (_, Value::String(err)) => println!("hypervisor used by default: none ({err})"),
                _ => {}
            }
            match (&selected["storage"]["name"], &selected["storage"]["error"]) {
                (Value::String(name), _) => println!("storage: {name}"),
                (_, Value::String(err)) => println!("storage: none ({err})"),
                _ => println!("storage: none (the bundle rootfs is shared as is)"),
            }
        }
        other => anyhow::bail!("invalid format {other:?}: want table or json"),
    }
    Ok(())
}

fn print_table(rows: &[Value]) {
    let header = [
        "KIND",
        "NAME",
        "VERSION",
        "AVAILABLE",
        "CAPABILITIES",
        "FILE",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut reasons = Vec::new();
    for r in rows {
        let caps: Vec<&str> = r["capabilities"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let available = r["available"].as_bool().unwrap_or(false);
        table.push(vec![
            r["kind"].as_str().unwrap_or("").into(),
            r["name"].as_str().unwrap_or("").into(),
            r["version"].as_str().unwrap_or("").into(),
            if available { "yes" } else { "no" }.into(),
            if caps.is_empty() {
                "-".into()
            } else {
                caps.join(",")
            },
            r["file"].as_str().unwrap_or("").into(),
        ]);
        if !available {
            reasons.push(format!(
                "{} {}: {}",
                r["kind"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or("")
            ));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    if !reasons.is_empty() {
        for reason in reasons {
            println!("not available: {reason}");
        }
    }
}
