//! CapFilt end to end on a generated dataset of a dozen images, some captions matching
//! their image's description and some swapped: every line gets a record with its
//! candidates, scores and decisions; bad lines are recorded, not fatal; a run stopped
//! half-way (and one torn mid-write) resumes to the same file as an uninterrupted run.

use std::path::Path;
use std::process::Command;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn capfilt(input: &Path, out: &Path, threshold: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(["capfilt", "--captioner"])
        .arg(fixtures().join("blip2-tiny-opt-f32"))
        .arg("--filter")
        .arg(fixtures().join("blip2-tiny-retrieval-f32"))
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args([
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--seed",
            "7",
            "--threshold",
            threshold,
            "--batch-size",
            "4",
        ])
        .args(extra)
        .output()
        .expect("iris runs")
}

/// 12 images (colour fields with a shape) and captions; every third caption swapped
/// with its neighbour's; plus a bad JSON line, a missing image and a corrupt image.
fn dataset(dir: &Path) -> std::path::PathBuf {
    let colours = [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
        ("yellow", [230, 220, 30]),
    ];
    let shapes = ["circle", "square", "stripe"];
    let mut lines = Vec::new();
    let mut captions = Vec::new();
    for i in 0..12 {
        let (cname, c) = colours[i % 4];
        let shape = shapes[i % 3];
        let img = image::RgbImage::from_fn(40 + i as u32, 36, |x, y| {
            let inside = match shape {
                "circle" => (x as i32 - 20).pow(2) + (y as i32 - 18).pow(2) < 100,
                "square" => (10..30).contains(&x) && (8..28).contains(&y),
                _ => (y / 6) % 2 == 0,
            };
            if inside {
                image::Rgb(c)
            } else {
                image::Rgb([240, 240, 240])
            }
        });
        let name = format!("img{i:02}.png");
        img.save(dir.join(&name)).unwrap();
        captions.push((name, format!("a {cname} {shape} on a white background")));
    }
    for i in 0..12 {
        let caption = if i % 3 == 2 {
            &captions[(i + 1) % 12].1
        } else {
            &captions[i].1
        };
        lines.push(serde_json::json!({"image": captions[i].0, "caption": caption}).to_string());
        if i == 5 {
            lines.push("{not json".to_string());
            lines.push(
                serde_json::json!({"image": "missing.png", "caption": "nothing"}).to_string(),
            );
            std::fs::write(dir.join("corrupt.png"), b"\x89PNG garbage").unwrap();
            lines
                .push(serde_json::json!({"image": "corrupt.png", "caption": "broken"}).to_string());
        }
    }
    let input = dir.join("pairs.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    input
}

#[test]
fn capfilt_records_decisions_and_resumes_to_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dataset(dir.path());

    // The tiny random filter scores everything near 0.49: probe with threshold 0 (all
    // kept), then split at the median.
    let probe = dir.path().join("probe.jsonl");
    assert!(capfilt(&input, &probe, "0", &[]).status.success());
    let mut scores: Vec<f64> = std::fs::read_to_string(&probe)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r.get("candidates").cloned())
        .flat_map(|c| c.as_array().unwrap().clone())
        .map(|c| {
            assert!(c["keep"].as_bool().unwrap());
            c["itm"].as_f64().unwrap()
        })
        .collect();
    scores.sort_by(f64::total_cmp);
    let threshold = format!("{}", scores[scores.len() / 2]);
    let t: f64 = threshold.parse().unwrap();

    let full = dir.path().join("full.jsonl");
    let out = capfilt(&input, &full, &threshold, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("capfilt: 15/15 lines done"),
        "progress: {stderr}"
    );
    let text = std::fs::read_to_string(&full).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 15);
    let lines: Vec<u64> = records
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(
        lines,
        (0..15).collect::<Vec<_>>(),
        "one record per input line, in order"
    );
    let errors: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 3, "bad JSON, missing image, corrupt image");
    let (mut kept, mut dropped) = (0, 0);
    for r in records.iter().filter(|r| r.get("candidates").is_some()) {
        let c = r["candidates"].as_array().unwrap();
        assert_eq!(c.len(), 3, "web caption + 2 synthetic");
        assert_eq!(c[0]["source"], "web");
        for cand in c {
            let itm = cand["itm"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&itm));
            assert_eq!(
                cand["keep"].as_bool().unwrap(),
                itm as f32 >= t as f32,
                "{itm} vs {t}"
            );
            if cand["keep"].as_bool().unwrap() {
                kept += 1
            } else {
                dropped += 1
            }
        }
    }
    assert!(
        kept > 0 && dropped > 0,
        "kept {kept}, dropped {dropped}: the threshold should split"
    );

    // Stopped after 5 lines, then torn mid-write, then resumed: the same file.
    let resumed = dir.path().join("resumed.jsonl");
    assert!(capfilt(&input, &resumed, &threshold, &["--max-lines", "5"])
        .status
        .success());
    assert_eq!(
        std::fs::read_to_string(&resumed).unwrap().lines().count(),
        5
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&resumed)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"line\": 5, \"image\": \"img05.pn").unwrap();
    drop(f);
    let again = capfilt(&input, &resumed, &threshold, &[]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&resumed).unwrap(),
        text,
        "resumed output differs"
    );
    // A finished file is left as it is.
    assert!(capfilt(&input, &resumed, &threshold, &[]).status.success());
    assert_eq!(std::fs::read_to_string(&resumed).unwrap(), text);
}

#[test]
fn capfilt_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = capfilt(
        &dir.path().join("absent.jsonl"),
        &dir.path().join("o.jsonl"),
        "0.5",
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("absent.jsonl") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A real SIGKILL part-way through, then a rerun: the same file as an uninterrupted run.
#[test]
fn capfilt_killed_midway_resumes_to_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dataset(dir.path());
    // Slower than the other tests (more samples, one image per batch) so the kill
    // lands part-way.
    let command = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_iris"));
        c.args(["capfilt", "--captioner"])
            .arg(fixtures().join("blip2-tiny-opt-f32"))
            .arg("--filter")
            .arg(fixtures().join("blip2-tiny-retrieval-f32"))
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(out)
            .args(["--seed", "7", "--threshold", "0.5", "--samples", "6"])
            .args(["--max-new-tokens", "12", "--batch-size", "1"])
            .stderr(std::process::Stdio::null());
        c
    };
    let full = dir.path().join("full.jsonl");
    assert!(command(&full).status().unwrap().success());
    let want = std::fs::read_to_string(&full).unwrap();

    let out = dir.path().join("killed.jsonl");
    let mut child = command(&out).spawn().unwrap();
    // Kill once a few records are on disk (if the run is faster than the poll, the
    // rerun below must still leave the finished file as it is).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let lines = std::fs::read_to_string(&out)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if lines >= 3 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let killed_at = std::fs::read_to_string(&out)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    eprintln!("killed after {killed_at} of 15 records");
    assert!(command(&out).status().unwrap().success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
}
