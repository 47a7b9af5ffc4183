//! The file source against hostile input: proptest-generated YAML-ish text, random edits of a
//! real ServiceEntry, and a fixed corpus (alias bombs, deep nesting, huge scalars, invalid
//! UTF-8). Whatever the input, parsing returns (services or errors with a line) without
//! panicking, in bounded time.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use proptest::prelude::*;
use vmlb_user::{model::NodeConfig, source::file as config};

fn node() -> NodeConfig {
    NodeConfig {
        snat: Some("10.0.0.9".parse().unwrap()),
        ..Default::default()
    }
}

const SEED: &str = include_str!("../../deploy/serviceentry-vms.yaml");

/// Parse `text`; every error must carry a line (the file itself is fine here).
fn check(text: &str) {
    match config::parse_str(text, Path::new("f.yaml"), &node()) {
        Ok(_) => {}
        Err(errs) => {
            assert!(!errs.0.is_empty());
            for e in &errs.0 {
                assert!(e.line.is_some(), "no line: {e}");
            }
        }
    }
}

/// Characters that make YAML interesting, and some that make ServiceEntries interesting.
fn yamlish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "\n",
        " ",
        "  ",
        "- ",
        ": ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a ",
        "*a",
        "&b ",
        "*b",
        "!!str ",
        "'",
        "\"",
        "#",
        "|",
        ">",
        "---\n",
        "...\n",
        "?",
        "%YAML 1.2\n",
        "\t",
        "~",
        "null",
        "kind: ServiceEntry\n",
        "apiVersion: networking.istio.io/v1\n",
        "spec:\n",
        "endpoints:\n",
        "- address: 10.0.0.1\n",
        "ports: [{number: 80}]\n",
        "addresses: [",
        "10.0.0.1",
        "metadata: {name: x}\n",
        "resolution: STATIC\n",
        "weight: ",
        "99999999999",
        "-1",
        "0x10",
        "é",
        "\u{0}",
        "\u{feff}",
        "x",
    ]);
    prop::collection::vec(pieces, 0..300).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn yamlish_text_never_panics(text in yamlish()) {
        check(&text);
    }

    #[test]
    fn edits_of_a_real_service_entry_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8)
    ) {
        let mut bytes = SEED.as_bytes().to_vec();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 => bytes.insert(i, byte),
                1 if i < bytes.len() => { bytes.remove(i); }
                _ if i < bytes.len() => bytes[i] = byte,
                _ => {}
            }
        }
        // Invalid UTF-8 goes through the file reader, the only way bytes reach the parser.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("se.yaml");
        std::fs::write(&file, &bytes).unwrap();
        if let Err(errs) = config::load(&[file], &node()) {
            for e in &errs.0 {
                prop_assert!(e.line.is_some() || e.message.contains("cannot read"), "{}", e);
            }
        }
    }
}

/// The corpus: each case must finish quickly with an error naming a line.
#[test]
fn hostile_corpus_is_refused_quickly_with_a_line() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        bomb += &format!("a{i}: &a{i} [{refs}]\n");
    }
    let mut cases: Vec<(&str, String)> = vec![
        ("alias bomb", bomb),
        ("deep flow nesting", "[".repeat(50_000)),
        ("deep block nesting", "- ".repeat(50_000)),
        (
            "deep mapping nesting",
            (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect(),
        ),
        (
            "huge scalar",
            format!("kind: \"{}\"\n", "x".repeat(2 << 20)),
        ),
        (
            "huge key count",
            "kind: ServiceEntry\n".to_string()
                + &(0..20_000)
                    .map(|i| format!("k{i}: v\n"))
                    .collect::<String>()
                + "k0: dup\n",
        ),
        (
            "services that multiply",
            SEED.replace(
                "  - 10.10.1.128\n",
                &(0..255)
                    .map(|i| format!("  - 10.20.0.{i}\n"))
                    .collect::<String>(),
            )
            .replace(
                "  - number: 80\n",
                &(1..=20)
                    .map(|p| format!("  - number: {p}\n    name: p{p}\n"))
                    .collect::<String>(),
            ),
        ),
    ];
    cases.push(("valid seed", SEED.to_string()));
    for (what, text) in &cases {
        let started = Instant::now();
        let result = config::parse_str(text, Path::new("f.yaml"), &node());
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{what}: {took:?}");
        match (*what, result) {
            ("valid seed", r) => assert_eq!(r.unwrap().len(), 2),
            (_, Ok(s)) => panic!("{what}: accepted {} services", s.len()),
            (_, Err(errs)) => {
                for e in &errs.0 {
                    assert!(e.line.is_some(), "{what}: {e}");
                }
                println!("{what}: {} in {took:?}", errs.0[0]);
            }
        }
    }
}

/// Files too large are refused before they are read whole.
#[test]
fn oversized_and_non_utf8_files_are_refused_with_where() {
    let dir = tempfile::tempdir().unwrap();
    let big: PathBuf = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; config::MAX_FILE_BYTES as usize + 1]).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, b"kind: ServiceEntry\nmetadata:\n  name: \xff\xfe\n").unwrap();
    let errs = config::load(&[big.clone(), bad.clone()], &node())
        .unwrap_err()
        .0;
    assert!(
        errs[0].to_string().contains("larger than 1048576 bytes"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[1].line, Some(3), "{}", errs[1]);
    assert!(errs[1].message.contains("not valid UTF-8"), "{}", errs[1]);
}
