//! Pipeline files follow the YAML 1.2 Core schema: only `true`/`false` are booleans, keys are
//! the text written, integers stay integers — a param named `n` stays `n`, `off` reaches a
//! command as `off`.

use e2e_tests::Project;

#[test]
fn yaml_1_1_booleans_stay_words_and_integers_stay_integers() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"name: words
params: {n: no, y: off, on: yes, mode: NO, id: 010, flag: true}
stages:
  echo:
    kind: command
    cmd: "echo ${params.n} ${params.y} ${params.on} ${params.mode} ${params.id} ${params.flag} > ${outputs.out}"
    outputs: [out]
"#,
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["export", "p.yaml", "echo.out", "out.txt"]).assert_ok();
    assert_eq!(p.read("out.txt"), "no off yes NO 10 true\n");
    // `--set` values follow the same rules: `on` is the word, in the plan's reason too.
    let plan = p.run(&["plan", "p.yaml", "--set", "y=on"]);
    assert!(plan.stdout.contains("will run"), "{}", plan.stdout);
    assert!(plan.stdout.contains(r#""echo no on yes NO 10 true"#), "{}", plan.stdout);
}
