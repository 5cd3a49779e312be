use super::*;
use crate::cache_key::KEY_FORMAT;

#[test]
fn iso_dates() {
    assert_eq!(iso8601(0.0), "1970-01-01T00:00:00Z");
    assert_eq!(iso8601(1_795_748_645.0), "2026-11-27T03:04:05Z");
}

fn manifest(key: &str, out: Entry) -> Manifest {
    let ki = KeyInput {
        format: KEY_FORMAT,
        kind: "command".into(),
        implementation: BTreeMap::new(),
        fields: BTreeMap::new(),
        params: BTreeMap::new(),
        inputs: BTreeMap::new(),
        outputs: vec!["o".into()],
        selected: BTreeMap::new(),
    };
    let mut m = Manifest::for_test("p", "s", ki, BTreeMap::from([("o".to_string(), out)]));
    m.key = key.into();
    m
}

#[test]
fn commit_lookup_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), "test", false).unwrap();
    let d = store.objects.put_bytes(b"out").unwrap();
    let m = manifest("k1", Entry { digest: d, kind: ObjKind::File, size: 3 });
    store.commit(&m).unwrap();
    assert_eq!(store.lookup("k1").unwrap().unwrap().1, m);
    assert!(store.lookup("k2").unwrap().is_none());
    store.cache.clear().unwrap();
    assert!(store.lookup("k1").unwrap().is_none());
    let r = store.verify(true).unwrap();
    assert!(r.index_rebuilt && r.corrupt.is_empty());
    assert_eq!(store.lookup("k1").unwrap().unwrap().1, m);
    assert_eq!(store.last_manifest("p", "s").unwrap(), m);
}

/// A snapshot beside a holder: it sees what is committed, and writing to it (the stat
/// cache, `last`) leaves the holder's index alone.
#[test]
fn a_snapshot_reads_what_the_holder_committed() {
    let dir = tempfile::tempdir().unwrap();
    let holder = Store::open(dir.path(), "run x.yaml", false).unwrap();
    let d = holder.objects.put_bytes(b"out").unwrap();
    let m = manifest("k1", Entry { digest: d, kind: ObjKind::File, size: 3 });
    holder.commit(&m).unwrap();
    let snap = Store::open_snapshot(dir.path()).unwrap();
    assert_eq!(snap.lookup("k1").unwrap().unwrap().1, m);
    assert_eq!(snap.last_manifest("p", "s").unwrap(), m);
    snap.cache.clear().unwrap();
    drop(snap);
    assert_eq!(holder.lookup("k1").unwrap().unwrap().1, m);
    // No store there yet: an empty view, and nothing is created.
    let none = Store::open_snapshot(&dir.path().join("none")).unwrap();
    assert!(none.lookup("k1").unwrap().is_none() && none.runs().is_empty());
    assert!(!dir.path().join("none").exists());
}

#[test]
fn second_writer_is_refused_with_holder() {
    let dir = tempfile::tempdir().unwrap();
    let _a = Store::open(dir.path(), "run x.yaml", false).unwrap();
    let err = StoreLock::acquire(dir.path(), "run y.yaml", false).err().unwrap().to_string();
    assert!(err.contains("in use by `orchestrate run x.yaml`"), "{err}");
    assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
}
