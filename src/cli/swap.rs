//! `twinrun vm swap --name <vm>`: a planned role swap of a running FT pair. Asked of
//! the primary's control socket: the standby takes the VM over at an epoch boundary
//! with everything acknowledged (nothing lost), the old primary becomes its standby.

use clap::Args;
use twinrun_control as control;

use crate::exit;

#[derive(Debug, Args)]
pub struct SwapArgs {
    /// Name of the VM (its primary end on this machine).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &SwapArgs) -> i32 {
    let sock = match control::socket_of(&a.name) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinrun: error: {e}");
            return exit::USAGE;
        }
    };
    match control::swap(&sock) {
        Ok((epoch, paused_us)) => {
            if a.json {
                println!("{{\"swapped\":true,\"epoch\":{epoch},\"paused_us\":{paused_us}}}");
            } else {
                println!(
                    "VM {}: the standby took the VM over at checkpoint {epoch} (guest paused \
                     here {:.1} ms); this end is its standby now",
                    a.name,
                    paused_us as f64 / 1e3
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("twinrun: error: {}: role swap: {e}", a.name);
            exit::GUEST_FAILED
        }
    }
}
