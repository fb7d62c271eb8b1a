//! Writes the starting corpus of every target: `seeds DIR` makes `DIR/<target>/<n>`. Fails
//! when a target does not accept one of its seeds (see [`runv_fuzz::seeds`]).

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: seeds DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    for (target, seeds) in runv_fuzz::seeds() {
        let Some((_, accepts)) = runv_fuzz::TARGETS.iter().find(|(t, _)| *t == target) else {
            eprintln!("seeds: no target {target}");
            std::process::exit(1);
        };
        let d = dir.join(target);
        if let Err(e) = std::fs::create_dir_all(&d) {
            eprintln!("seeds: mkdir {}: {e}", d.display());
            std::process::exit(1);
        }
        for (i, s) in seeds.iter().enumerate() {
            if !accepts(s) {
                eprintln!("seeds: {target} does not accept its seed {i}: update runv_fuzz::seeds");
                std::process::exit(1);
            }
            let p = d.join(i.to_string());
            if let Err(e) = std::fs::write(&p, s) {
                eprintln!("seeds: write {}: {e}", p.display());
                std::process::exit(1);
            }
        }
    }
}
