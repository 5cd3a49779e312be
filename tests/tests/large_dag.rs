//! Large DAGs: a join over 5,000 inputs runs (inputs reach a command by short relative paths,
//! so its length does not depend on where the store lives), `${inputs.@list}` hands a command
//! every input in a file, and a command over the kernel's argument limit fails before it
//! starts, naming the stage and the limit.

use std::fmt::Write;

use e2e_tests::Project;

/// N independent stages and one join over all their outputs, by `cat` or by a list file.
fn wide(n: usize, join: &str) -> String {
    let mut s = String::from("name: wide\nstages:\n");
    for i in 0..n {
        writeln!(s, "  s{i}: {{kind: command, cmd: \"echo {i} > ${{outputs.o}}\", outputs: [o]}}").unwrap();
    }
    s.push_str("  join:\n    kind: command\n    outputs: [o]\n");
    let cat: String = (0..n).map(|i| format!("${{inputs.i{i}}} ")).collect();
    writeln!(s, "    cmd: \"{}\"", join.replace("CAT", &cat)).unwrap();
    s.push_str("    inputs:\n");
    for i in 0..n {
        writeln!(s, "      i{i}: s{i}.o").unwrap();
    }
    s
}

#[test]
fn a_join_over_5000_inputs_runs() {
    let n = 5000;
    let p = Project::new();
    p.write("wide.yaml", &wide(n, "cat CAT> ${outputs.o}"));
    let r = p.run(&["run", "wide.yaml", "--json"]);
    r.assert_ok();
    assert_eq!(r.statuses().len(), n + 1);
    p.run(&["export", "wide.yaml", "join.o", "all.txt"]).assert_ok();
    let all = p.read("all.txt");
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), n);
    // Inputs are named i0, i1, …, and reach the command in that order.
    assert_eq!((lines[0], lines[n - 1]), ("0", "4999"));
    let again = p.run(&["run", "wide.yaml", "--json"]);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "a rerun is fully cached");
}

#[test]
fn inputs_list_file_hands_a_command_every_input() {
    let p = Project::new();
    p.write("wide.yaml", &wide(30, "xargs cat < ${inputs.@list} > ${outputs.o}"));
    p.run(&["run", "wide.yaml"]).assert_ok();
    p.run(&["export", "wide.yaml", "join.o", "all.txt"]).assert_ok();
    let mut got: Vec<u32> = p.read("all.txt").lines().map(|l| l.parse().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..30).collect::<Vec<_>>());
}

#[test]
fn a_command_over_the_argument_limit_fails_before_it_starts() {
    let p = Project::new();
    let big = "x".repeat(140_000);
    p.write(
        "big.yaml",
        &format!("name: big\nparams: {{blob: {big}}}\nstages:\n  huge:\n    kind: command\n    cmd: \"echo ${{params.blob}} > ${{outputs.o}}\"\n    outputs: [o]\n"),
    );
    let r = p.run(&["run", "big.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("stage `huge`") && r.stderr.contains("-byte limit"), "{}", r.stderr);
    assert!(r.stderr.contains("${inputs.@list}"), "{}", r.stderr);
    assert!(!r.stderr.contains("Argument list too long"), "{}", r.stderr);
}
