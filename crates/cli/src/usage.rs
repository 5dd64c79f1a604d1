//! `upstream usage`: per-second usage of the server's sandboxes, from its database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use upstream_server::UsageGrouping;
use upstream_vmm::DataDir;

use crate::exit::{Exit, Failure};

#[derive(Args)]
pub struct UsageArgs {
    /// Count usage from this time on: an RFC 3339 time such as 2025-01-31T00:00:00Z, or a
    /// duration before now such as 24h or 7days (default: everything).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Group by `key` (API key) or by `metadata KEY` (a sandbox metadata value).
    #[arg(long, num_args = 1..=2, value_names = ["key|metadata", "KEY"])]
    by: Vec<String>,
    /// Price of one vCPU-second, to add a cost column.
    #[arg(long, value_name = "PRICE")]
    price_vcpu_second: Option<f64>,
    /// Price of one GiB-second of memory, to add a cost column.
    #[arg(long, value_name = "PRICE")]
    price_gib_second: Option<f64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(data: &DataDir, args: UsageArgs) -> anyhow::Result<u8> {
    let grouping = grouping(&args.by)?;
    let since_ms = args.since.as_deref().map(parse_since).transpose()?;
    let db = upstream_server::open_db(data).context("opening the server database")?;
    let lines = db.usage_report(since_ms, &grouping)?;
    let priced = args.price_vcpu_second.is_some() || args.price_gib_second.is_some();
    let cost = |line: &upstream_server::UsageLine| {
        line.vcpu_secs * args.price_vcpu_second.unwrap_or(0.0)
            + line.gib_secs * args.price_gib_second.unwrap_or(0.0)
    };

    if args.json {
        let report: Vec<serde_json::Value> = lines
            .iter()
            .map(|line| {
                let mut value = serde_json::to_value(line).expect("a usage line serializes");
                if priced {
                    value["cost"] = serde_json::json!(cost(line));
                }
                value
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    print!(
        "{:<32} {:>9} {:>12} {:>12} {:>12}",
        "GROUP", "SANDBOXES", "WALL_S", "VCPU_S", "GIB_S"
    );
    println!(
        "{}",
        if priced {
            format!(" {:>12}", "COST")
        } else {
            String::new()
        }
    );
    for line in &lines {
        print!(
            "{:<32} {:>9} {:>12.1} {:>12.1} {:>12.1}",
            line.group, line.sandboxes, line.wall_secs, line.vcpu_secs, line.gib_secs
        );
        println!(
            "{}",
            if priced {
                format!(" {:>12.4}", cost(line))
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

fn grouping(by: &[String]) -> anyhow::Result<UsageGrouping> {
    match by {
        [] => Ok(UsageGrouping::Total),
        [kind] if kind == "key" => Ok(UsageGrouping::Key),
        [kind, key] if kind == "metadata" => Ok(UsageGrouping::Metadata(key.clone())),
        _ => Err(Failure::new(
            Exit::Usage,
            format!(
                "invalid --by '{}'; use `--by key` or `--by metadata KEY`",
                by.join(" ")
            ),
        )
        .into()),
    }
}

/// Unix milliseconds of an RFC 3339 time, or of now minus a duration.
fn parse_since(text: &str) -> anyhow::Result<i64> {
    let time = match humantime::parse_rfc3339_weak(text) {
        Ok(time) => time,
        Err(_) => match humantime::parse_duration(text) {
            Ok(ago) => SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH),
            Err(_) => {
                return Err(Failure::new(
                    Exit::Usage,
                    format!(
                        "invalid --since '{text}'; use a time such as 2025-01-31T00:00:00Z \
                         or a duration such as 24h"
                    ),
                )
                .into())
            }
        },
    };
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Ok(since.as_millis() as i64)
}
