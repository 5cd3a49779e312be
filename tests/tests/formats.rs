//! Our files open in the reference tools: tokenizer.json in Python `tokenizers`.

use e2e_tests::{venv_python, Project};

const PIPELINE: &str = r#"name: tok
stages:
  corpus:
    kind: corpus
    params: {documents: 300, seed: 1}
  vocab:
    kind: vocab
    foreach: [char, bpe, word]
    inputs: {text: corpus.train.txt, valid: corpus.valid.txt}
    params: {type: "${item}", size: 300}
"#;

#[test]
fn python_tokenizers_reads_our_tokenizer_json_and_agrees() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["export", "p.yaml", "corpus.valid.txt", "valid.txt"]).assert_ok();
    let sample: String = p.read("valid.txt").chars().take(2000).collect();
    p.write("sample.txt", &sample);
    for kind in ["char", "bpe", "word"] {
        let file = format!("{kind}.json");
        p.run(&["export", "p.yaml", &format!("vocab@{kind}.tokenizer.json"), &file]).assert_ok();
        let ours = tokenizers::Tokenizer::from_file(p.path().join(&file)).unwrap();
        let ours: Vec<u32> = ours.encode(sample.as_str(), false).unwrap().get_ids().to_vec();
        let script = "import json, sys\nfrom tokenizers import Tokenizer\nt = Tokenizer.from_file(sys.argv[1])\ntext = open(sys.argv[2], encoding='utf-8').read()\nenc = t.encode(text, add_special_tokens=False)\nprint(json.dumps({'ids': enc.ids, 'vocab': t.get_vocab_size(), 'round': t.decode(enc.ids, skip_special_tokens=False) == text}))\n";
        let out = std::process::Command::new(venv_python())
            .arg("-c")
            .arg(script)
            .arg(p.path().join(&file))
            .arg(p.path().join("sample.txt"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: python failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let theirs: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(theirs, ours, "{kind}: Python and Rust tokenize differently");
        if kind != "word" {
            assert_eq!(v["round"], true, "{kind}: decode(encode(text)) == text in Python");
        }
    }
}
