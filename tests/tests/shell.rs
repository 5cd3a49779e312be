//! The command line as a shell sees it: `orchestrate completions SHELL` prints the script a
//! shell loads, and bash, running the bash one, completes verbs and each verb's options.

use std::process::Command;

use e2e_tests::Project;

/// What bash's completion offers for the last of `words`, by its protocol: COMP_WORDS and
/// COMP_CWORD set, the function called with the command, the current and the previous word.
fn bash_completes(p: &Project, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let (cur, prev) = (words[words.len() - 1], words[words.len() - 2]);
    let script = format!(
        "source ./orchestrate.bash; COMP_WORDS=({}); COMP_CWORD={}; _orchestrate orchestrate '{cur}' '{prev}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        words.len() - 1
    );
    let out = Command::new("bash").arg("-c").arg(&script).current_dir(p.path()).output().expect("running bash");
    assert!(out.status.success(), "bash: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(String::from).collect()
}

#[test]
fn bash_completes_verbs_and_options_from_the_generated_script() {
    let p = Project::new();
    let script = p.run(&["completions", "bash"]);
    script.assert_ok();
    p.write("orchestrate.bash", &script.stdout);
    assert_eq!(bash_completes(&p, &["orchestrate", "pl"]), ["plan"]);
    let verbs = bash_completes(&p, &["orchestrate", ""]);
    for verb in ["run", "plan", "compare", "serve", "ui", "completions", "--store"] {
        assert!(verbs.iter().any(|v| v == verb), "`{verb}` not offered: {verbs:?}");
    }
    assert!(!verbs.iter().any(|v| v == "exec-stage"), "the internal subcommand is offered: {verbs:?}");
    assert_eq!(bash_completes(&p, &["orchestrate", "run", "--re"]), ["--rerun", "--remote"]);
    assert_eq!(bash_completes(&p, &["orchestrate", "compare", "--fail-on"]), ["--fail-on-regress"]);
    // The other shells' scripts, without the internal subcommand either.
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let s = p.run(&["completions", shell]);
        s.assert_ok();
        assert!(s.stdout.contains("compare") && !s.stdout.contains("exec-stage"), "{shell}:\n{}", s.stdout);
    }
    let tcsh = p.run(&["completions", "tcsh"]);
    assert_eq!(tcsh.code, 2, "{}", tcsh.stderr);
    assert!(tcsh.stderr.contains("possible values: bash, elvish, fish, powershell, zsh"), "{}", tcsh.stderr);
}

/// A listing read by a reader that stops early (`| head -1`) ends quietly, as `ls` does: no
/// panic on the closed pipe. The reader is gone before orchestrate writes, so every write fails.
#[test]
fn a_listing_cut_short_by_its_reader_ends_quietly() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a: {kind: command, cmd: \"echo a > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "p.yaml"]).assert_ok();
    for args in [
        &["runs", "--json"][..],
        &["show", "p.yaml", "a", "--json"],
        &["dag", "p.yaml"],
        &["compare", "latest", "latest"],
    ] {
        let mut child = (p.cmd().args(args))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting orchestrate");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("waiting for orchestrate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        use std::os::unix::process::ExitStatusExt;
        assert!(out.status.success() || out.status.signal() == Some(13), "{args:?}: {:?} {stderr}", out.status);
    }
}
