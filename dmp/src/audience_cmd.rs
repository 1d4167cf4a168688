//! `dmp audience "expr" [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--api URL] [--json]`: asks a running
//! dmp's `GET /v1/audience` (the process that counts holds the sketches) and prints the answer.

use anyhow::Context;

use crate::out;

/// Arguments of `dmp audience`.
#[derive(Debug, clap::Args)]
pub struct AudienceArgs {
    /// Segment expression: ids with and / or / not and parentheses, e.g. "cats and not dogs".
    pub expr: String,
    /// First day (UTC), YYYY-MM-DD; default: `--to`.
    #[arg(long)]
    pub from: Option<String>,
    /// Last day (UTC), YYYY-MM-DD; default: today.
    #[arg(long)]
    pub to: Option<String>,
    /// The API of a running dmp (default: http://<api.listen>).
    #[arg(long)]
    pub api: Option<String>,
    /// Print the JSON answer as it came.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command: exit code 1 with the API's reason when the query is refused.
pub async fn run(cfg: dmp_core::Config, args: AudienceArgs) -> anyhow::Result<()> {
    let base = args
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.api.listen));
    let mut query = vec![("expr", args.expr.clone())];
    if let Some(f) = &args.from {
        query.push(("from", f.clone()));
    }
    if let Some(t) = &args.to {
        query.push(("to", t.clone()));
    }
    let url = format!("{}/v1/audience", base.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .get(&url)
        .query(&query)
        .send()
        .await
        .with_context(|| format!("cannot reach the dmp API at {base} (is `dmp run` up? --api)"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            body["error"]
                .as_str()
                .unwrap_or("the API refused the query")
        );
    }
    if args.json {
        return out(format_args!("{body}"));
    }
    out(format_args!(
        "{} users ({} to {}), between {} and {}; {}{}",
        body["estimate"],
        body["from"].as_str().unwrap_or("?"),
        body["to"].as_str().unwrap_or("?"),
        body["low"],
        body["high"],
        body["method"].as_str().unwrap_or("?"),
        if body["too_small"].as_bool() == Some(true) {
            "; TOO SMALL to trust relative to the union of its segments"
        } else {
            ""
        }
    ))?;
    if let Some(segs) = body["segments"].as_object() {
        for (id, n) in segs {
            out(format_args!("  {id}: {n}"))?;
        }
    }
    Ok(())
}
