//! `tollgate keys new`: makes a key, prints it once, and prints the `[[keys]]` entry (its hash)
//! to put in the config. The key itself is stored nowhere.

use crate::config::KeyKind;
use crate::keys;

pub struct NewKey {
    pub account: uuid::Uuid,
    pub kind: KeyKind,
    pub workspaces: Vec<uuid::Uuid>,
    pub expires: Option<String>,
    pub id: Option<String>,
}

pub fn new_key(args: NewKey) -> Result<(), String> {
    if let Some(e) = &args.expires {
        keys::parse_expiry(e)?;
    }
    let key = keys::generate(args.kind);
    let id = args
        .id
        .unwrap_or_else(|| format!("key-{}", &keys::hash_string(&key)[7..15]));
    let kind = match args.kind {
        KeyKind::User => "user",
        KeyKind::Service => "service",
    };
    println!("{key}");
    println!();
    println!("[[keys]]");
    println!("id = {}", toml_string(&id));
    println!("hash = \"{}\"", keys::hash_string(&key));
    println!("account = \"{}\"", args.account);
    if !args.workspaces.is_empty() {
        let list: Vec<String> = args.workspaces.iter().map(|w| format!("\"{w}\"")).collect();
        println!("workspaces = [{}]", list.join(", "));
    }
    println!("kind = \"{kind}\"");
    if let Some(e) = &args.expires {
        println!("expires = \"{e}\"");
    }
    eprintln!("The key is on the first line: store it now, it is not shown again. Add the [[keys]] entry to the config.");
    Ok(())
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"key\"".into())
}
