//! `orchestrate ui`: serve the read-only web view of the store (the `ui` module) until Ctrl-C.

use anyhow::anyhow;

use super::{Env, Failure};
use crate::ui::Ui;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Address to bind (127.0.0.1: this machine only; the view has no login).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8765)]
    port: u16,
}

pub(super) fn ui(env: &Env, a: Args) -> Result<i32, Failure> {
    let addr = super::socket_addr(&a.host, a.port)?;
    let Some(ui) = Ui::open(&env.root) else { return Err(env.no_store("E-UI").into()) };
    let rt = super::runtime()?;
    rt.block_on(async move {
        let listener = super::listen(addr).await?;
        let bound = listener.local_addr()?;
        // One line, flushed: a script reads the address from it.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stdout(),
            "orchestrate ui on http://{bound}/ — store {} (read-only); Ctrl-C or SIGTERM stops",
            env.root.display()
        );
        let _ = std::io::stdout().flush();
        crate::ui::serve(listener, ui, super::serve::shutdown_signal()).await.map_err(|e| anyhow!(e))
    })?;
    Ok(0)
}
