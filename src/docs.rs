//! The man pages (`affa(8)`, `affa-agent(8)`) and the shell completions (bash, zsh, fish), made
//! by the binary from its own definitions: the clap command line ([`cli::Cli`], rendered by
//! clap_mangen and clap_complete), the usage lines ([`cli::USAGE`]) and the key table that
//! `--show-default-config` prints (`affa::config::keys::KEYS`). `--install` writes them, and the
//! packages are built from such an install, so a page never describes another affa than the
//! one it ships with.
//!
//! Owns: the text of the pages and completion scripts, and the completion of job names (from
//! `affa --_jobs`, as Affa 3's bash completion). Must never: read the configuration or the disk
//! (the completions call `affa --_jobs` when a person presses TAB), or describe an option or a
//! key by hand that the code defines.

use std::io::Write;

use affa::config::keys::{self, Scope, KEYS};
use affa::install::Generated;
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

use crate::cli;

/// Where the man pages and completions are installed.
pub const MAN_AFFA: &str = "/usr/share/man/man8/affa.8";
pub const MAN_AGENT: &str = "/usr/share/man/man8/affa-agent.8";
pub const BASH_COMPLETION: &str = "/usr/share/bash-completion/completions/affa";
pub const ZSH_COMPLETION: &str = "/usr/share/zsh/vendor-completions/_affa";
pub const FISH_COMPLETION: &str = "/usr/share/fish/vendor_completions.d/affa.fish";

/// Every file `--install` writes from the definitions.
pub fn generated() -> Vec<Generated> {
    vec![
        Generated { path: MAN_AFFA, data: man_affa() },
        Generated { path: MAN_AGENT, data: man_agent() },
        Generated { path: BASH_COMPLETION, data: completion(Shell::Bash) },
        Generated { path: ZSH_COMPLETION, data: completion(Shell::Zsh) },
        Generated { path: FISH_COMPLETION, data: completion(Shell::Fish) },
    ]
}

fn command() -> Command {
    cli::Cli::command()
}

/// A key's default as the page shows it.
fn default_of(name: &str) -> String {
    keys::lookup(name).and_then(|d| d.default.first()).map_or_else(String::new, |v| v.to_string())
}

/// A request without arguments (`.PP`, `.TP`, `.br`).
const NO_ARGS: [&str; 0] = [];

/// One section: `.SH TITLE` and paragraphs of plain text.
fn section(r: &mut Roff, title: &str, paragraphs: &[&str]) {
    r.control("SH", [title]);
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            r.control("PP", NO_ARGS);
        }
        r.text([roman(*p)]);
    }
}

/// A tagged paragraph: `term` in bold, then its text.
fn tagged(r: &mut Roff, term: &str, text: &str) {
    r.control("TP", NO_ARGS);
    r.text([bold(term)]);
    r.text([roman(text)]);
}

/// `affa(8)`: name, synopsis (the usage lines), description, options (clap), the configuration
/// keys (the key table), files, environment, exit status, see also, version.
pub fn man_affa() -> Vec<u8> {
    let cmd = command();
    let man = Man::new(cmd).section("8").manual("System Administration");
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);

    let mut r = Roff::new();
    r.control("SH", ["SYNOPSIS"]);
    for (i, u) in cli::USAGE.iter().enumerate() {
        if i > 0 {
            r.control("br", NO_ARGS);
        }
        r.text([bold("affa"), roman(format!(" {u}"))]);
    }
    let root = default_of("RootDir");
    section(
        &mut r,
        "DESCRIPTION",
        &[
            "affa keeps rotating archives of Linux hosts and hot backups of running VMware ESXi virtual machines on a Linux backup server. It pulls each host over ssh with rsync; for an ESXi VM it freezes the disks with a snapshot through the vSphere API, copies them and removes the snapshot. Big files (VM disks, images) are stored as compressed, deduplicated chunks, read on the host by affa-agent(8).",
            &format!("Each job is a section of a configuration file in /etc/affa (see CONFIGURATION). Its archives are RootDir/JOB/scheduled.0, daily.0 ... yearly.N (RootDir defaults to {root}); the newest is scheduled.0. Cron starts the runs (affa --make-cronjobs writes the cron file from every job's TimeSchedule)."),
            "One action per call; any unique prefix of an option works (--list for --list-archives). Destructive actions (--cleanup, --delete-job, --move-archive, --full-restore) show what they will do and ask you to type proceed; --yes answers for scripts.",
        ],
    );
    let _ = out.write_all(r.render().as_bytes());
    let _ = man.render_options_section(&mut out);

    let mut r = Roff::new();
    configuration_section(&mut r);
    r.control("SH", ["FILES"]);
    let files: [(String, &str); 9] = [
        ("/etc/affa/*.conf".into(), "the configuration: [GlobalAffaConfig] and one section per job (subdirectories included)"),
        (format!("{root}/JOB/"), "the archives of JOB (RootDir is per job)"),
        (default_of("cronFile"), "the cron file, written by affa from the configuration (--make-cronjobs, and every 15 minutes by --_cronupdate when the configuration changed)"),
        (format!("{}/JOB.log", default_of("logDir")), "the log of JOB; affa-GLOBAL-LOGFILE.log is the global one"),
        (format!("{}/JOB", default_of("lockDir")), "the run lock of JOB"),
        (default_of("sshDir"), "affa's ssh key and the known-hosts file of each job (written by --send-key)"),
        (affa::install::AGENT_PATH.into(), "the static agent that affa copies to a host (agentBinary)"),
        (affa::install::LOGROTATE_PATH.into(), "the rotation of the logs"),
        (affa::install::TMPFILES_PATH.into(), "makes the lock directory at boot, root's, before any user could"),
    ];
    for (path, what) in &files {
        tagged(&mut r, path, what);
    }
    r.control("SH", ["ENVIRONMENT"]);
    tagged(&mut r, "AFFA_CONFIG_DIR", "the configuration directory when --config-dir is not given (default /etc/affa)");
    tagged(&mut r, "NO_COLOR", "set: no colours on a terminal (as TERM=dumb)");
    r.control("SH", ["EXIT STATUS"]);
    tagged(&mut r, "0", "success");
    tagged(
        &mut r,
        "1",
        "an error (one line, the last one printed: affa: error: ...), or configuration errors (--configcheck)",
    );
    tagged(&mut r, "2", "a usage error: a missing or extra argument, two actions, an option the action does not take");
    tagged(&mut r, "0 to 3", "--nrpe: the Nagios plugin codes OK, WARNING, CRITICAL, UNKNOWN");
    section(
        &mut r,
        "SEE ALSO",
        &["affa-agent(8), rsync(1), ssh(1), crontab(5). In the source: README.md and docs/ (MIGRATION.md for Affa 3 users, FORMAT.md, OPERATIONS.md, RESTORE.md, SECURITY.md)."],
    );
    let _ = out.write_all(r.render().as_bytes());
    let _ = man.render_version_section(&mut out);
    out
}

/// CONFIGURATION: the files, then every key of the table `--show-default-config` prints, by
/// scope, with what it takes and its default.
fn configuration_section(r: &mut Roff) {
    section(
        r,
        "CONFIGURATION",
        &[
            "Every *.conf file under /etc/affa (or --config-dir, or $AFFA_CONFIG_DIR) is read. Lines are KEY=VALUE under a [SECTION] header; # starts a comment. The section [GlobalAffaConfig] holds the global keys and the defaults of every job; any other section is a job of that name. A multi-valued key is repeated, one value a line. An unknown key or a value a key does not take is an error naming the file, line, key and value: it stops that job only (an error in [GlobalAffaConfig] stops every job); affa --configcheck lists them all.",
            "affa --show-default-config prints this list as a configuration file; affa --show-property KEY describes one key and shows each job's value.",
        ],
    );
    for (scope, title, intro) in [
        (Scope::Global, "Global keys", "Only in [GlobalAffaConfig]:"),
        (Scope::Job, "Job keys", "In a job section, or in [GlobalAffaConfig] as the default of every job:"),
    ] {
        r.control("SS", [title]);
        r.text([roman(intro)]);
        for d in KEYS.iter().filter(|d| d.scope == scope) {
            r.control("TP", NO_ARGS);
            r.text([bold(d.name), roman("="), italic(keys::expected(d.kind))]);
            let default = if d.default.is_empty() { "none".to_string() } else { d.default.join(", ") };
            let multi = if d.multi { " Multi-valued: repeat the line." } else { "" };
            r.text([roman(format!("{}. Default: {default}.{multi}", d.help))]);
        }
    }
}

/// The agent's command line (crates/agent parses it by hand, std only: it is linked statically
/// and runs under `env -i`). tests/it/ops.rs checks it against the agent's own usage line.
fn agent_command() -> Command {
    Command::new("affa-agent")
        .version(env!("CARGO_PKG_VERSION"))
        .about("affa's agent on a backed-up host: reads big files once, sends only the chunks affa lacks")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(Arg::new("serve").long("serve").action(ArgAction::SetTrue).help(
            "Speak the affa agent protocol on stdin and stdout (affa starts it this way over the job's ssh connection)",
        ))
        .arg(
            Arg::new("version")
                .long("version")
                .action(ArgAction::SetTrue)
                .help("Print the agent's version and protocol version"),
        )
}

/// `affa-agent(8)`.
pub fn man_agent() -> Vec<u8> {
    let man = Man::new(agent_command()).section("8").manual("System Administration");
    let mut out = Vec::new();
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let mut r = Roff::new();
    section(
        &mut r,
        "DESCRIPTION",
        &[
            &format!("affa-agent is the other end of affa(8) on a backed-up host. It is one statically linked file, installed on the backup server as {} and copied by affa to each host whose job has chunkFiles: by default to .affa/affa-agent in the remote user's home, on an ESXi host to /vmfs/volumes/DATASTORE/.affa/affa-agent (remoteAgentPath). The copy is checked by its BLAKE3 at every run and replaced when it differs from the server's.", affa::install::AGENT_PATH),
            "For a backup it reads each big file once, sequentially, skipping holes, hashes its chunks and sends only the chunks the server's pool lacks, compressed as the pool stores them. For a restore it writes a file in place, asking only for the chunks an existing copy lacks, and replaces the file only once its whole hash matches the archive's. It writes nothing else on the host, needs no configuration, and exits when affa closes the connection.",
            "Nobody starts it by hand: affa runs it over the job's own ssh connection (the same key and pinned host key). affa --install-agent installs or checks it on the hosts.",
        ],
    );
    let _ = out.write_all(r.render().as_bytes());
    let _ = man.render_options_section(&mut out);
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    tagged(&mut r, "0", "the session ended normally");
    tagged(&mut r, "1", "affa went away in the middle of a request");
    tagged(&mut r, "2", "a protocol error, or a usage error");
    section(&mut r, "SEE ALSO", &["affa(8); docs/PROTOCOL.md in the source."]);
    let _ = out.write_all(r.render().as_bytes());
    out
}

/// The completion script for `shell`: clap_complete's (every option), and job names from
/// `affa --_jobs` wherever a word is not an option (as Affa 3's bash completion).
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "affa", &mut out);
    let hook = match shell {
        Shell::Bash => bash_jobs(),
        Shell::Zsh => return zsh_with_jobs(out),
        Shell::Fish => FISH_JOBS.to_string(),
        _ => String::new(),
    };
    out.extend_from_slice(hook.as_bytes());
    out
}

/// bash: clap's function `_affa` completes the options and the values of the options that take
/// one (`--to DIR`); any other word is a job name.
fn bash_jobs() -> String {
    let valued: Vec<String> = command()
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    format!(
        r#"
# Job names (Affa 3's completion through affa --_jobs): a word that is not an option, nor the
# value of an option that takes one.
_affa_with_jobs() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev=""
    [ "$COMP_CWORD" -gt 0 ] && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$cur" in
        -*) _affa "$@"; return ;;
    esac
    case "$prev" in
        {})
            _affa "$@"; return ;;
    esac
    local IFS=$'\n'
    COMPREPLY=($(compgen -W "$(affa --_jobs 2>/dev/null)" -- "$cur"))
}}
complete -F _affa_with_jobs -o bashdefault -o default affa
"#,
        valued.join("|")
    )
}

/// fish: job names for any word that is not an option.
const FISH_JOBS: &str =
    "\n# Job names (Affa 3's completion through affa --_jobs).\ncomplete -c affa -f -a '(affa --_jobs 2>/dev/null)'\n";

/// zsh: clap's spec of the positional arguments completes files (`_default`); it completes
/// job names instead.
fn zsh_with_jobs(script: Vec<u8>) -> Vec<u8> {
    let s = String::from_utf8_lossy(&script).into_owned();
    let s = s.replace(
        ":args -- Job names and other arguments of the action:_default'",
        ":args -- Job names and other arguments of the action:_affa_jobs'",
    );
    format!("{s}\n# Job names (Affa 3's completion through affa --_jobs).\n(( $+functions[_affa_jobs] )) ||\n_affa_jobs() {{\n    local -a jobs\n    jobs=(${{(f)\"$(affa --_jobs 2>/dev/null)\"}})\n    compadd -a jobs\n}}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn the_man_page_has_every_visible_option_and_every_key() {
        let page = text(&man_affa());
        assert!(page.starts_with(".ie \\n(.g .ds Aq \\(aq") || page.contains(".TH affa 8"), "{}", &page[..200]);
        assert!(page.contains(".TH affa 8"), "{}", &page[..300]);
        for a in command().get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(l) = a.get_long() {
                let roff = format!("\\-\\-{}", l.replace('-', "\\-"));
                assert!(page.contains(&roff), "--{l} missing from the page");
            }
        }
        for d in KEYS {
            let roff = d.name.replace('-', "\\-");
            assert!(page.contains(&format!("\\fB{roff}\\fR=")), "key {} missing from the page", d.name);
        }
        // Hidden internal options are not documented.
        assert!(!page.contains("_cronupdate\\fR") && !page.contains("\\-\\-_setup"));
        assert!(page.contains(".SH CONFIGURATION") && page.contains(".SH SYNOPSIS") && page.contains(".SH FILES"));
        assert!(page.contains(env!("AFFA_VERSION")), "the version section names the commit");
    }

    #[test]
    fn the_agent_page_documents_its_two_options() {
        let page = text(&man_agent());
        assert!(page.contains(".TH affa-agent 8"), "{page}");
        assert!(page.contains("\\-\\-serve") && page.contains("\\-\\-version"), "{page}");
        assert!(!page.contains("\\-\\-help"), "the agent has no --help");
    }

    #[test]
    fn completions_offer_options_and_job_names() {
        let bash = text(&completion(Shell::Bash));
        assert!(bash.contains("--list-archives") && bash.contains("affa --_jobs"), "{bash}");
        assert!(bash.trim_end().ends_with("complete -F _affa_with_jobs -o bashdefault -o default affa"));
        // The value of an option that takes one is left to clap's completion of that value.
        assert!(bash.contains("--to|") && bash.contains("|--config-dir)"), "{bash}");
        let zsh = text(&completion(Shell::Zsh));
        assert!(zsh.contains(":_affa_jobs'") && zsh.contains("affa --_jobs"), "clap's zsh spec changed:\n{zsh}");
        let fish = text(&completion(Shell::Fish));
        assert!(fish.contains("-l list-archives") && fish.contains("(affa --_jobs 2>/dev/null)"), "{fish}");
    }
}
