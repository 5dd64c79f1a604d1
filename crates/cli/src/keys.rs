//! `upstream key`: API keys of `upstream serve`, stored hashed in its database.

use anyhow::Context;
use clap::Subcommand;
use upstream_vmm::DataDir;

use crate::exit::{Exit, Failure};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an API key and print it once on stdout.
    Create {
        /// Name that identifies the key in listings and usage reports.
        #[arg(long, default_value = "default")]
        name: String,
        /// Maximum number of sandboxes this key may hold at once (default: the server's
        /// --max-sandboxes-per-key).
        #[arg(long, value_name = "N")]
        max_sandboxes: Option<u32>,
    },
    /// List API keys: id, name, limit, creation and revocation time.
    Ls {
        /// Print the list as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key; requests with it fail from then on.
    Revoke {
        /// Key id, as `upstream key ls` prints it (key_...).
        id: String,
    },
}

pub fn run(data: &DataDir, command: KeyCommand) -> anyhow::Result<u8> {
    let db = upstream_server::open_db(data).context("opening the server database")?;
    match command {
        KeyCommand::Create {
            name,
            max_sandboxes,
        } => {
            let key = db.create_key(&name, max_sandboxes)?;
            note!(
                "Created API key {} ({name}). It is shown only now; send it as \
                 `Authorization: Bearer KEY`:",
                key.record.id
            );
            println!("{}", key.secret);
        }
        KeyCommand::Ls { json } => {
            let keys = db.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(0);
            }
            println!(
                "{:<18} {:<20} {:>8}  {:<24} REVOKED",
                "ID", "NAME", "MAX", "CREATED"
            );
            for key in keys {
                let max = key
                    .max_sandboxes
                    .map_or_else(|| "-".to_string(), |max| max.to_string());
                let revoked = key.revoked_ms.map_or_else(|| "-".to_string(), format_ms);
                println!(
                    "{:<18} {:<20} {:>8}  {:<24} {revoked}",
                    key.id,
                    key.name,
                    max,
                    format_ms(key.created_ms)
                );
            }
        }
        KeyCommand::Revoke { id } => match db.revoke_key(&id) {
            Ok(()) => note!("Revoked API key {id}"),
            Err(err @ upstream_server::DbError::KeyNotFound(_)) => {
                return Err(Failure::new(Exit::Usage, err.to_string()).into())
            }
            Err(err) => return Err(err.into()),
        },
    }
    Ok(0)
}

/// RFC 3339 form of a Unix time in milliseconds.
pub fn format_ms(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}
