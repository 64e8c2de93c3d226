//! Legacy (pre-1.6, non-zip) `torch.save` files, as scripts/make_legacy.py
//! wrote them with torch: the same tensors as the safetensors copy, views and
//! shared storages as torch reads them, refusals, and the commands users run.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dialogd::model::weights::{TensorStore, WeightsFile};
use dialogd::model::Gpt2;
use dialogd::pipeline::rank::Ranker;
use dialogd::tokenizer::DialogTokenizer;

use crate::support::{assert_fails_with, dialogd, fixtures, floats, ranker_dir, rpt_golden, section_toml, settings_from, stdout, strings};

fn legacy(name: &str) -> PathBuf {
    fixtures().join("legacy").join(name)
}

fn store(path: &Path, dtype: DType) -> TensorStore {
    TensorStore::load(&WeightsFile::at(path), dtype, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shape_of(store: &TensorStore, name: &str) -> Vec<usize> {
    store.shape(name).unwrap_or_else(|| panic!("no {name}")).to_vec()
}

/// Every tensor of `reference` equals the one of the same name in `other`,
/// bit for bit, and `other` has no tensor the reference lacks but `extra`.
fn assert_same_tensors(mut reference: TensorStore, mut other: TensorStore, extra: &[&str]) {
    let mut names: Vec<String> = reference.names().map(str::to_string).collect();
    names.sort();
    assert!(names.len() > 20, "{names:?}");
    for name in &names {
        let shape = shape_of(&reference, name);
        let want = reference.take(name, &shape).unwrap();
        let got = other.take(name, &shape).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.dtype(), want.dtype(), "{name}");
        let (want, got) = (bits(&want), bits(&got));
        assert!(want == got, "{name} differs");
    }
    let mut left = other.leftover();
    left.retain(|n| !extra.contains(&n.as_str()));
    assert!(left.is_empty(), "only in the legacy file: {left:?}");
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn dialogpt_pkl_loads_to_the_safetensors_tensors() {
    let safetensors = fixtures().join("pico-safetensors").join("model.safetensors");
    let pkl = fixtures().join("pico-pkl").join("pico_ft.pkl");
    // The folder's one .pkl is its weights file.
    assert_eq!(WeightsFile::find(&fixtures().join("pico-pkl")).unwrap(), WeightsFile::PyTorch(pkl.clone()));
    let mut legacy_store = store(&pkl, DType::F32);
    // `lm_head.decoder.weight` (the DialoGPT name) is the tied head, stored
    // once: it reads as the embedding.
    let head = legacy_store.take("lm_head.weight", &shape_of(&legacy_store, "wte.weight")).unwrap();
    assert_same_tensors(store(&safetensors, DType::F32), legacy_store, &[]);
    let wte = store(&safetensors, DType::F32).take("wte.weight", head.dims()).unwrap();
    assert_eq!(bits(&head), bits(&wte));
}

#[test]
fn f16_storages_load_as_torch_rounded_them() {
    // torch's `.half()` against candle's conversion of the same f32 values:
    // both round to nearest even, so the bits agree.
    let reference = store(&fixtures().join("pico-safetensors").join("model.safetensors"), DType::F16);
    let half = store(&legacy("pico-f16.bin"), DType::F16);
    assert_same_tensors(reference, half, &["lm_head.weight"]);
}

#[test]
fn views_offsets_and_storage_views_read_as_torch_reads_them() {
    // views.safetensors holds what torch.load made of views.pt.
    let mut want = store(&legacy("views.safetensors"), DType::F32);
    let mut got = store(&legacy("views.pt"), DType::F32);
    let mut names: Vec<String> = want.names().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, ["base", "column", "half_t", "rows", "tail_view", "tail_view_t", "transposed"]);
    for name in &names {
        let shape = shape_of(&want, name);
        assert_eq!(shape_of(&got, name), shape, "{name}");
        let (w, g) = (want.take(name, &shape).unwrap(), got.take(name, &shape).unwrap());
        assert_eq!(bits(&w), bits(&g), "{name}");
    }
}

#[test]
fn big_endian_files_are_refused() {
    let err = TensorStore::load(&WeightsFile::at(&legacy("big-endian.pt")), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("big-endian") && err.contains("big-endian.pt"), "{err}");
}

/// The command the malicious pickle would run creates this file.
const MARKER: &str = "/tmp/dialogd-legacy-pickle-ran";

#[test]
fn a_pickle_calling_os_system_is_refused_without_running_it() {
    let _ = std::fs::remove_file(MARKER);
    let path = legacy("os-system.pkl");
    let err = TensorStore::load(&WeightsFile::at(&path), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("`os.system`") && err.contains("nothing in the file was run"), "{err}");
    // As a user meets it: a model folder holding the file.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("pico-pkl").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(&path, dir.path().join("small_ft.pkl")).unwrap();
    let out = dialogd(&["generate", "--model", dir.path().to_str().unwrap(), "--greedy", "hello"]);
    assert_fails_with(&out, "`os.system`");
    assert!(!Path::new(MARKER).exists(), "the pickle's command ran");
}

#[test]
fn rank_takes_a_pkl_reverse_model_file() {
    // The same MMI scores from the legacy file as from the safetensors
    // folder holding the same weights, with the tokenizer given apart.
    let case = &rpt_golden()["rankers"]["updown"]["cases"][0];
    let ranker = ranker_dir("updown");
    let tokenizer = fixtures().join("gpt2");
    let scores = |mmi: Option<&Path>| -> Vec<f64> {
        let mut args: Vec<String> = vec!["rank".into(), "--ranker".into(), ranker.to_string_lossy().into_owned()];
        if let Some(mmi) = mmi {
            args.extend(["--mmi".into(), mmi.to_string_lossy().into_owned()]);
        }
        args.extend(["--tokenizer".into(), tokenizer.to_string_lossy().into_owned(), "--json".into()]);
        for c in strings(&case["candidates"]) {
            args.extend(["--response".to_string(), c]);
        }
        args.push("--".into());
        args.extend(strings(&case["turns"]));
        let out = dialogd(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", crate::support::stderr(&out));
        floats(&serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["scores"])
    };
    let from_pkl = scores(Some(&fixtures().join("pico-pkl").join("pico_ft.pkl")));
    let from_folder = scores(Some(&fixtures().join("pico-safetensors")));
    assert_eq!(from_pkl.len(), strings(&case["candidates"]).len());
    assert_eq!(from_pkl, from_folder);
    // The reverse model took part: without it the scores differ.
    assert_ne!(from_pkl, scores(None));
}

#[test]
fn a_bare_pkl_without_config_is_inferred_or_explained() {
    // pico is 8 wide: its head count cannot be inferred, and the error says
    // what to add. (DialoGPT's widths, multiples of 64, infer; see the
    // unit test of `infer_gpt2_config`.)
    let dir = tempfile::tempdir().unwrap();
    let pkl = dir.path().join("pico_reverse.pkl");
    std::fs::copy(fixtures().join("pico-pkl").join("pico_ft.pkl"), &pkl).unwrap();
    let err = Gpt2::load(&pkl, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("multiple of 64"), "{err}");
    // With a config beside it, the file alone is a model.
    std::fs::copy(fixtures().join("pico-pkl").join("config.json"), dir.path().join("config.json")).unwrap();
    let model = Gpt2::load(&pkl, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().n_embd, 8);
}

/// The MMI scores the daemon's ranker (`pipeline::rank::Ranker`, loaded as
/// `daemon.rs` loads it) gives with `[ranking] mmi = MMI`, read through the
/// settings loader.
async fn daemon_mmi_scores(mmi: &Path, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Vec<f32> {
    let lines = [format!("mmi = \"{}\"", mmi.display()), "mmi_weight = 1.0".to_string()];
    let settings = settings_from(&section_toml("ranking", &lines));
    let ranker = Ranker::load(&settings.ranking, &settings.model).unwrap().expect("[ranking] mmi set: a ranker");
    let scored = ranker.score(turns.to_vec(), candidates.to_vec(), vec![0.0; candidates.len()]).await.unwrap();
    scored.iter().map(|s| s.mmi.expect("an MMI score")).collect()
}

#[tokio::test]
async fn the_daemons_ranking_mmi_takes_a_pkl_file() {
    // The legacy file as `[ranking] mmi`: the same scores as the
    // safetensors folder holding the same weights.
    let tokenizer = DialogTokenizer::from_dir(&fixtures().join("pico-pkl")).unwrap();
    let ids = |text: &str| tokenizer.encode(text).unwrap();
    let turns = [ids("Does money buy happiness?"), ids("Depends how much money you spend on it.")];
    let candidates = [ids("What is the best way to buy happiness?"), ids("Money does not buy happiness."), ids("lol")];
    let from_pkl = daemon_mmi_scores(&fixtures().join("pico-pkl").join("pico_ft.pkl"), &turns, &candidates).await;
    let from_folder = daemon_mmi_scores(&fixtures().join("pico-safetensors"), &turns, &candidates).await;
    assert_eq!(from_pkl.len(), candidates.len());
    assert_eq!(from_pkl, from_folder);
    assert!(from_pkl.iter().all(|s| s.is_finite() && *s < 0.0), "{from_pkl:?}");
    assert!(from_pkl[0] != from_pkl[1] || from_pkl[1] != from_pkl[2], "no candidate told apart: {from_pkl:?}");
}
