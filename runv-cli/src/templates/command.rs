//! `runv template create|list|rm`.

use std::path::PathBuf;

use anyhow::bail;

use super::build::{self, Request};
use super::{Meta, Store, store_dir, validate_name};
use crate::bundle::{self, Bundle, VmSection};
use crate::commands::context::Ctx;
use runv_cli::cli::{CreateArgs, TemplateArgs, TemplateCommand};

fn check_format(format: &str) -> anyhow::Result<bool> {
    match format {
        "table" => Ok(false),
        "json" => Ok(true),
        other => bail!("invalid format {other:?}: want table or json"),
    }
}

pub fn run(ctx: &Ctx, args: &TemplateArgs) -> anyhow::Result<()> {
    let dir = store_dir(ctx.opts.template_dir.as_deref());
    match &args.command {
        TemplateCommand::Create(a) => create(ctx, dir, a),
        TemplateCommand::List(a) => {
            let json = check_format(&a.format)?;
            let store = Store::open(&dir)?;
            print(&store, &store.list()?, json)
        }
        TemplateCommand::Rm(a) => {
            let store = Store::open(&dir)?;
            for name in &a.templates {
                let Some(meta) = store.find(name)? else {
                    bail!("template {name} does not exist");
                };
                store.remove(&meta.key)?;
            }
            Ok(())
        }
    }
}

/// The same inputs `create` gives a container's monitor, so that a template made here is
/// the one a container of that shape looks for.
fn create(ctx: &Ctx, dir: PathBuf, a: &CreateArgs) -> anyhow::Result<()> {
    let json = check_format(&a.format)?;
    if let Some(name) = &a.name {
        validate_name(name)?;
    }
    let bundle = a.bundle.as_deref().map(Bundle::load).transpose()?;
    let vm = bundle
        .as_ref()
        .map(Bundle::vm_section)
        .unwrap_or_else(VmSection::default);
    let (kernel, initrd) = bundle::guest_files(&ctx.opts, &vm, &ctx.host)?;
    let (default_vcpus, default_memory) = (ctx.host.vcpus.value, ctx.host.memory_mib.value);
    let (bundle_vcpus, bundle_memory) = bundle
        .as_ref()
        .map(|b| b.vm_size(default_vcpus, default_memory))
        .unwrap_or((default_vcpus, default_memory));
    let registry = ctx.registry();
    let hypervisor = registry.choose_hypervisor(ctx.opts.driver.as_deref())?;
    let info = hypervisor.client.info();
    let parameters = crate::commands::create::hypervisor_parameters(ctx, info.name.as_str(), &vm)?;
    // As the monitor decides: the rootfs is a share where the driver can share directories,
    // else a disk (a directory becomes an image), and volumes need a share.
    let can_share = super::clone_capabilities(info.capabilities)
        .contains(runv_api::Capabilities::SHARED_DIR_ROOTFS);
    let (mut shares, disks) = if can_share {
        (vec![crate::monitor::ROOTFS_TAG.to_string()], Vec::new())
    } else {
        (Vec::new(), vec![crate::monitor::ROOTFS_TAG.to_string()])
    };
    if a.volumes && can_share {
        shares.push(crate::monitor::volumes::TAG.to_string());
    }
    let request = Request {
        store: dir,
        driver_dirs: ctx.opts.driver_dirs.clone(),
        driver: info.name.to_string(),
        name: a.name.clone(),
        kernel,
        initrd,
        kernel_params: crate::commands::create::kernel_params(&vm, ctx.debug),
        vcpus: a.vcpus.unwrap_or(bundle_vcpus).clamp(1, 64),
        memory_mib: a
            .memory_mib
            .unwrap_or(bundle_memory)
            .max(bundle::MIN_MEMORY_MIB),
        shares,
        nics: a.nics,
        disks,
        parameters,
        agent_timeout_secs: crate::commands::create::agent_timeout()?,
    };
    let meta = build::build(&request, true)?.ok_or_else(|| anyhow::anyhow!("lock not taken"))?;
    let store = Store::open(&request.store)?;
    print(&store, &[meta], json)
}

fn print(store: &Store, templates: &[Meta], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<serde_json::Value> = templates
            .iter()
            .map(|m| {
                serde_json::json!({
                    "key": m.key,
                    "name": m.name,
                    "path": store.path(&m.key),
                    "created": m.created,
                    "disk_bytes": store.disk_usage(&m.key),
                    "kernel": m.kernel,
                    "initrd": m.initrd,
                    "shape": m.shape,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<24}  {:<16}  {:<8}  {:>5}  {:>7}  {:<20}  {:>4}  {:>9}",
        "KEY", "NAME", "DRIVER", "VCPUS", "MEMORY", "SHARES", "NICS", "DISK"
    );
    for m in templates {
        println!(
            "{:<24}  {:<16}  {:<8}  {:>5}  {:>6}M  {:<20}  {:>4}  {:>8}M",
            m.key,
            m.name.as_deref().unwrap_or("-"),
            m.shape.driver,
            m.shape.vcpus,
            m.shape.memory_mib,
            m.shape.shares.join(","),
            m.shape.nics,
            store.disk_usage(&m.key) >> 20
        );
    }
    Ok(())
}
