//! The offline engines for real: the Whisper, SmolLM2 and neural-voice workers, espeak-ng
//! and the earshot endpointer, driven through `atlas-voice serve` and directly. Needs the models
//! (`atlas-voice models fetch`, which `scripts/test.sh` runs) and the worker binaries (built
//! by `cargo build` / `cargo nextest run --workspace`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use atlas_client::{ConnectOptions, Connection, Incoming, connect, stream_pcm, wav};
use atlas_local::ipc::Request;
use atlas_local::stt::LocalStt;
use atlas_local::tts::{ESPEAK_RATE, Espeak};
use atlas_local::vad::{EndpointConfig, Endpointer, VadEvent};
use atlas_local::worker::{Worker, WorkerConfig};
use atlas_protocol::{AudioFormat, ClientMessage, ErrorCode, ServerEvent, SessionStart};
use atlas_providers::llm::{ChatMessage, LlmEvent, LlmProvider, LlmRequest};
use atlas_providers::tts::{TtsProvider, TtsRequest};

use atlas_testkit::{ServerProcess, token};

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("ATLAS_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    for file in [
        "whisper-tiny.en/ggml-model.bin",
        "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "piper-joe/en_US-joe-medium.onnx",
        "piper-joe/en_US-joe-medium.onnx.json",
        "onnxruntime/libonnxruntime.so.1.31.1",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run `atlas-voice models fetch` (with ATLAS_MODELS_DIR={})",
            dir.join(file).display(),
            dir.display()
        );
    }
    dir
}

fn worker_program(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_atlas-voice")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workers with `cargo build --workspace`",
        path.display()
    );
    path
}

async fn stt_worker(queue: usize) -> Arc<Worker> {
    Worker::start(WorkerConfig {
        name: "speech recognition",
        program: worker_program("atlas-voice-stt"),
        args: vec![
            "--model".into(),
            models_dir().join("whisper-tiny.en/ggml-model.bin").into(),
        ],
        queue,
        start_timeout: Duration::from_secs(60),
        nice: 0,
    })
    .await
    .unwrap()
}

async fn llm_worker(queue: usize) -> Arc<Worker> {
    Worker::start(WorkerConfig {
        name: "language model",
        program: worker_program("atlas-voice-llm"),
        args: vec![
            "--model".into(),
            models_dir()
                .join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
                .into(),
        ],
        queue,
        start_timeout: Duration::from_secs(60),
        nice: 0,
    })
    .await
    .unwrap()
}

/// "What is the weather like in Paris today?", 0.3 s of silence before, 1.2 s after.
fn spoken_question() -> Vec<i16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/audio/question_16k.wav");
    let (samples, rate) = wav::read(&path).unwrap();
    assert_eq!(rate, 16_000);
    samples
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| w.len() >= 3)
        .map(str::to_lowercase)
        .collect()
}

/// `audio` (16 kHz) transcribed by the local recogniser: what it heard, how many of the
/// [`words`] of `text` are in it, and of how many.
async fn heard_back(audio: &[i16], text: &str) -> (String, usize, usize) {
    let stt = LocalStt::new(
        stt_worker(2).await,
        "whisper-tiny.en",
        EndpointConfig::default(),
        None,
    );
    let back = stt.transcribe(audio, Some("en".into())).await.unwrap();
    let said = words(text);
    let heard = words(&back);
    let found = said.iter().filter(|w| heard.contains(w)).count();
    (back, found, said.len())
}

/// `atlas-voice serve` on the local engines with the pinned models, plus `extra`.
fn serve(extra: &[(&str, &str)]) -> Result<ServerProcess, String> {
    let mut env = vec![("ATLAS_MODELS_DIR", models_dir().display().to_string())];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    atlas_testkit::serve(Path::new(env!("CARGO_BIN_EXE_atlas-voice")), &env)
}

async fn session(server: &ServerProcess) -> Connection {
    let conn = connect(&ConnectOptions::new(server.url(), token("local-user")))
        .await
        .unwrap();
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart {
            output_audio: AudioFormat {
                sample_rate: 16_000,
                ..AudioFormat::DEFAULT_OUTPUT
            },
            ..SessionStart::default()
        }))
        .await
        .unwrap();
    conn
}

/// An ONNX Runtime worker (`program`) with `args`.
async fn onnx_worker(
    name: &'static str,
    program: &str,
    args: Vec<std::ffi::OsString>,
) -> Arc<Worker> {
    Worker::start(WorkerConfig {
        name,
        program: worker_program(program),
        args,
        queue: 2,
        start_timeout: Duration::from_secs(60),
        nice: 0,
    })
    .await
    .unwrap()
}

async fn tts_worker() -> Arc<Worker> {
    let args = atlas_local::piper::worker_args(&models_dir()).unwrap();
    onnx_worker("speech synthesis", "atlas-voice-tts", args).await
}

async fn turn_worker() -> Arc<Worker> {
    let args = atlas_local::smart_turn::worker_args(&models_dir()).unwrap();
    onnx_worker("end of turn", "atlas-voice-turn", args).await
}

#[derive(Default)]
struct Turn {
    transcript: String,
    /// Partial transcripts, in order, that came before the final one.
    partials: Vec<String>,
    reply: String,
    audio: Vec<i16>,
    errors: Vec<ErrorCode>,
}

/// Whether a reply ends on a complete sentence.
fn ends_a_sentence(text: &str) -> bool {
    text.trim_end()
        .trim_end_matches(['"', '\'', ')'])
        .ends_with(['.', '!', '?'])
}

/// Collects one turn's events until `response.done`.
async fn collect_turn(conn: &mut Connection) -> Turn {
    let mut turn = Turn::default();
    loop {
        let incoming = tokio::time::timeout(Duration::from_secs(60), conn.incoming.recv())
            .await
            .expect("the turn finishes within a minute")
            .expect("the connection stays open");
        match incoming {
            Incoming::Event { event, .. } => match event {
                ServerEvent::TranscriptPartial { text, .. } if turn.transcript.is_empty() => {
                    turn.partials.push(text)
                }
                ServerEvent::TranscriptFinal { text, .. } => turn.transcript = text,
                ServerEvent::ResponseTextDelta { text, .. } => turn.reply.push_str(&text),
                ServerEvent::ResponseDone { .. } => return turn,
                ServerEvent::Error { code, .. } => turn.errors.push(code),
                _ => {}
            },
            Incoming::Audio { pcm, .. } => turn.audio.extend(
                pcm.chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]])),
            ),
            Incoming::Closed { code, reason, .. } => panic!("closed {code:?}: {reason}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_question_gets_a_spoken_answer_that_transcribes_back_to_its_words() {
    // Partials every 400 ms of speech (700 by default), so that one is decoded while the
    // question is spoken even when the machine is busy with other tests.
    // The voice and the recogniser speak English only; the small model, asked about Paris,
    // answers in French on some machines (on this session's VM every time, at the commit
    // before this change too, even when told "in English"), which no English voice can say
    // back. One English example answer in the prompt keeps it in English (3 of 3 here).
    let prompt = "You are a helpful voice assistant. Answer the question directly in one short, \
                  correct sentence. Example: Q: What is the capital of Spain? A: The capital of \
                  Spain is Madrid.";
    let server = serve(&[
        ("ATLAS_LOCAL_STT_PARTIAL_MS", "400"),
        ("ATLAS_LOCAL_SYSTEM_PROMPT", prompt),
    ])
    .expect("serve starts on the local engines");
    let mut conn = session(&server).await;
    let sender = conn.sender.clone();
    let question = spoken_question();
    let streaming =
        tokio::spawn(async move { stream_pcm(&sender, &question, 16_000, 20, 1.0).await });
    let turn = collect_turn(&mut conn).await;
    streaming.await.unwrap().unwrap();

    let heard = turn.transcript.to_lowercase();
    assert!(
        heard.contains("weather") && heard.contains("paris"),
        "transcript {:?}",
        turn.transcript
    );
    assert!(turn.errors.is_empty(), "errors {:?}", turn.errors);
    assert!(!turn.reply.trim().is_empty(), "the reply has text");
    // Words were shown while the question was being spoken, before the final transcript.
    assert!(
        !turn.partials.is_empty(),
        "no partial transcript before the final {:?}",
        turn.transcript
    );
    assert!(
        turn.partials.iter().any(|p| {
            let p = p.to_lowercase();
            p.contains("what") || p.contains("weather")
        }),
        "partials {:?}",
        turn.partials
    );
    assert!(ends_a_sentence(&turn.reply), "reply {:?}", turn.reply);
    let seconds = turn.audio.len() as f64 / 16_000.0;
    assert!(seconds >= 0.5, "reply audio is {seconds:.2} s");

    // Round trip: the reply audio, transcribed by the same local recogniser, gives back
    // the reply's words.
    let (back, found, of) = heard_back(&turn.audio, &turn.reply).await;
    assert!(
        found * 2 >= of && found > 0,
        "reply {:?} (to {:?}) came back as {back:?} ({found} of {of} words)",
        turn.reply,
        turn.transcript,
    );
}

#[test]
fn serve_without_models_says_which_command_fetches_them() {
    let empty = tempfile::tempdir().unwrap();
    // Each engine moved to the cloud in turn: the next missing model is named.
    let cloud = [
        ("ATLAS_STT", "deepgram"),
        ("DEEPGRAM_API_KEY", "k"),
        ("ATLAS_LLM", "anthropic"),
        ("ANTHROPIC_API_KEY", "k"),
    ];
    for (in_the_cloud, missing) in [(0, "whisper-tiny.en"), (2, "smollm2"), (4, "piper-joe")] {
        let mut env = vec![("ATLAS_MODELS_DIR", empty.path().to_str().unwrap())];
        env.extend_from_slice(&cloud[..in_the_cloud]);
        let err = serve(&env).err().expect("serve refuses to start");
        assert!(
            err.contains(&format!("atlas-voice models fetch {missing}")),
            "error was: {err}"
        );
    }
}

#[test]
fn models_verify_checks_the_pinned_checksums() {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args(["models", "verify", "--dir"])
        .arg(models_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok       whisper-tiny.en"), "{text}");
    assert!(text.contains("ok       smollm2"), "{text}");

    // A damaged copy is caught and the fix is named.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("smollm2")).unwrap();
    std::fs::write(
        dir.path().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        b"not a model",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args(["models", "verify", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("CORRUPT  smollm2"), "{text}");
    assert!(
        text.contains("missing  whisper-tiny.en  run `atlas-voice models fetch whisper-tiny.en`"),
        "{text}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args(["models", "fetch", "whisper-huge", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model \"whisper-huge\""));
}

#[tokio::test]
async fn the_endpointer_finds_one_utterance_in_a_spoken_question() {
    let audio = spoken_question();
    let mut ep = Endpointer::new(EndpointConfig {
        end_silence_ms: 300,
        ..EndpointConfig::default()
    });
    let mut events = Vec::new();
    for chunk in audio.chunks(320) {
        ep.push(chunk, &mut events);
    }
    assert_eq!(events.len(), 2, "{events:?}");
    let VadEvent::SpeechStarted { at } = events[0] else {
        panic!("{:?}", events[0])
    };
    let start = at as f64 / 16_000.0;
    // The clip has 0.3 s of silence before the speech.
    assert!(
        (0.2..0.6).contains(&start),
        "speech started at {start:.2} s"
    );
    let VadEvent::Utterance(u) = &events[1] else {
        panic!("{:?}", events[1])
    };
    let end = u.speech_end as f64 / 16_000.0;
    let speech_end = atlas_client::speech_end(&audio, 16_000, -40.0)
        .unwrap()
        .as_secs_f64();
    assert!(
        (end - speech_end).abs() < 0.25,
        "speech ended at {end:.2} s, expected ~{speech_end:.2} s"
    );
    assert!(u.audio.len() as f64 / 16_000.0 > speech_end - start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_turns_work_away_and_a_dead_worker_comes_back() {
    let llm = llm_worker(1).await;
    let request = || LlmRequest {
        system: "You are a helpful voice assistant. Answer in one short sentence.".into(),
        messages: vec![ChatMessage::user("Name three colours.")],
        max_tokens: 40,
        temperature: Some(0.5),
        ..LlmRequest::default()
    };
    let provider = atlas_local::llm::LocalLlm::new(
        llm.clone(),
        "smollm2",
        atlas_local::llm::Decoding {
            temperature: 0.5,
            ..Default::default()
        },
    );
    let first = provider.stream(request()).await.unwrap();
    // The queue holds one request: the second is refused at once, not delayed.
    let busy = provider.stream(request()).await.err().expect("refused");
    assert!(busy.is_busy(), "{busy}");
    assert_eq!(busy.label(), "busy");
    // Dropping the first stream cancels it and frees the place.
    drop(first);
    let mut ok = None;
    for _ in 0..50 {
        match provider.stream(request()).await {
            Ok(s) => {
                ok = Some(s);
                break;
            }
            Err(e) if e.is_busy() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let events: Vec<_> = ok.expect("the place was freed").collect().await;
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Ok(LlmEvent::Delta(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert!(!text.trim().is_empty());
    assert!(
        matches!(events.last(), Some(Ok(LlmEvent::Done { .. }))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Ok(LlmEvent::Usage(u)) if u.input_tokens.unwrap_or(0) > 10))
    );

    // Kill the worker: the request in flight fails, the next one starts a new worker.
    let stt = stt_worker(2).await;
    let pid = stt.pid().await.expect("running");
    let ticket = stt
        .submit(
            |id| Request::Transcribe {
                partial: false,
                id,
                language: Some("en".into()),
            },
            &vec![0u8; 32_000 * 5],
        )
        .await
        .unwrap();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut ticket = ticket;
    let err = ticket.next().await.expect_err("the request fails");
    assert!(err.to_string().contains("stopped"), "{err}");
    drop(ticket);
    let stt = LocalStt::new(stt, "whisper-tiny.en", EndpointConfig::default(), None);
    let text = stt.transcribe(&spoken_question(), None).await.unwrap();
    assert!(text.to_lowercase().contains("weather"), "{text}");
}

/// 16-bit PCM bytes at `rate` as 16 kHz samples.
fn to_16k(bytes: &[u8], rate: u32) -> Vec<i16> {
    let samples: Vec<i16> = bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    let mut resampler = atlas_core::resample::StreamResampler::new(rate, 16_000).unwrap();
    let mut out = Vec::new();
    resampler.process(&samples, &mut out);
    resampler.flush(&mut out);
    out
}

/// Checks that `tts` refuses a voice it does not have, naming it.
async fn assert_refuses_unknown_voice(tts: &impl TtsProvider) {
    let err = tts
        .synthesize(TtsRequest {
            text: "hi".into(),
            voice: Some("klingon".into()),
        })
        .await
        .err()
        .expect("unknown voice");
    assert!(err.to_string().contains("klingon"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_neural_voice_says_the_words_and_refuses_unknown_voices() {
    use atlas_local::piper::{PIPER_RATE, PiperTts};
    let tts = PiperTts::new(tts_worker().await, "piper-joe");
    assert_eq!(tts.sample_rate(), PIPER_RATE);
    assert!(tts.has_voice("joe") && !tts.has_voice("klingon"));
    let text = "Paris is the capital of France. It is known for the Eiffel Tower.";
    let stream = synthesis(&tts, text).await;
    // One chunk per sentence, so playback can start after the first.
    let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(chunks.len(), 2, "{} chunks", chunks.len());
    let bytes: Vec<u8> = chunks.concat();
    let seconds = bytes.len() as f64 / 2.0 / f64::from(PIPER_RATE);
    assert!((2.0..9.0).contains(&seconds), "{seconds:.2} s of speech");

    // Transcribed back by the local recogniser, the audio gives the text's words.
    let (back, found, of) = heard_back(&to_16k(&bytes, PIPER_RATE), text).await;
    assert!(
        found * 4 >= of * 3,
        "{text:?} came back as {back:?} ({found} of {of} words)"
    );

    assert_refuses_unknown_voice(&tts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_first_audio_sounds_whole_when_heard_back() {
    use atlas_core::splitter::{SentenceSplitter, SplitterConfig};
    use atlas_local::piper::{PIPER_RATE, PiperTts};
    // A reply with no clause break early, streamed as a model streams it, cut as a reply's
    // text is cut with the default eager setting (five words).
    let text = "The tallest mountain on our planet is Mount Everest in Nepal.";
    let mut splitter = SentenceSplitter::new(SplitterConfig {
        eager_words: 5,
        ..SplitterConfig::default()
    });
    let now = std::time::Instant::now();
    let mut pieces = Vec::new();
    for token in text.split_inclusive(' ') {
        splitter.push(token, now, &mut pieces);
    }
    pieces.extend(splitter.finish());
    assert_eq!(pieces[0], "The tallest mountain on our", "{pieces:?}");
    assert_eq!(pieces.len(), 2, "{pieces:?}");

    // Each piece synthesised on its own, played one after the other.
    let tts = PiperTts::new(tts_worker().await, "piper-joe");
    let mut bytes = Vec::new();
    for piece in &pieces {
        let stream = tts
            .synthesize(TtsRequest {
                text: piece.clone(),
                voice: None,
            })
            .await
            .unwrap();
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        bytes.extend_from_slice(&chunks.concat());
    }
    let (back, found, of) = heard_back(&to_16k(&bytes, PIPER_RATE), text).await;
    eprintln!("{pieces:?} heard back as {back:?}");
    assert!(
        found * 4 >= of * 3,
        "{pieces:?} came back as {back:?} ({found} of {of} words)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_turn_model_scores_as_its_reference_implementation_does() {
    use atlas_local::smart_turn::SmartTurn;
    use atlas_providers::turn::TurnProvider as _;
    let model = SmartTurn::new(turn_worker().await);
    // The spoken question cut at three points, and the scores pipecat-ai 1.14.0's own code
    // (its vendored Whisper features, ONNX Runtime) gives for the same samples
    // (`scripts/smart_turn_reference.py`). The model is erratic on espeak-ng speech
    // (shared/LOCAL_ENGINES.md): these check that the worker computes what the model's
    // authors compute, not that the verdicts are right. ONNX Runtime's int8 kernels differ
    // between CPUs with VNNI instructions and those without, and so do the scores of both
    // implementations: the reference is the one of this machine's kind.
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    let reference = if vnni {
        [0.946_61, 0.017_68, 0.338_59]
    } else {
        [0.978_55, 0.016_36, 0.032_69]
    };
    let question = spoken_question();
    let cases = [
        ("after 0.5 s", 8_000, reference[0]),
        ("after 1.6 s", 25_600, reference[1]),
        ("the whole recording", question.len(), reference[2]),
    ];
    for (what, len, expected) in cases {
        let p = model.score(&question[..len]).await.unwrap();
        assert!(
            (p - expected).abs() < 2e-3,
            "{what}: scored {p}, the reference {expected} (CPU with VNNI: {vnni}; a CPU of \
             another kind needs its own reference: scripts/smart_turn_reference.py)"
        );
    }
}

/// `text` going to synthesis with the default voice.
async fn synthesis(tts: &impl TtsProvider, text: &str) -> atlas_providers::tts::AudioStream {
    tts.synthesize(TtsRequest {
        text: text.into(),
        voice: None,
    })
    .await
    .unwrap()
}

/// "I am looking for a flight to | London.", said in one go by the neural voice with 700 ms
/// of silence cut in after "to" (`tests/audio/paused_flight_16k.wav`, made
/// by `atlas-voice eval --save-clips`: scripts/make-test-audio.sh), and 2.5 s of silence
/// after it. A recording, not synthesis at test time: the neural voice samples noise, so each
/// synthesis differs and the end-of-turn model's answer with it.
fn said_with_a_pause() -> Vec<i16> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/audio/paused_flight_16k.wav");
    let (mut samples, rate) = wav::read(&path).unwrap();
    assert_eq!(rate, 16_000);
    samples.extend(std::iter::repeat_n(0, 2_500 * 16));
    samples
}

/// The words of the first turn that ends when `audio` is spoken to a server with `env`.
async fn first_turn_heard(audio: Vec<i16>, env: &[(&str, &str)]) -> (String, ServerProcess) {
    let server = serve(env).expect("serve starts on the local engines");
    let mut conn = session(&server).await;
    let sender = conn.sender.clone();
    let streaming = tokio::spawn(async move { stream_pcm(&sender, &audio, 16_000, 20, 1.0).await });
    let heard = loop {
        let incoming = tokio::time::timeout(Duration::from_secs(60), conn.incoming.recv())
            .await
            .expect("a turn ends within a minute")
            .expect("the connection stays open");
        match incoming {
            Incoming::Event {
                event: ServerEvent::TranscriptFinal { text, .. },
                ..
            } => break text,
            Incoming::Event {
                event: ServerEvent::Error { code, message, .. },
                ..
            } => panic!("{code:?}: {message}"),
            Incoming::Closed { code, reason, .. } => panic!("closed {code:?}: {reason}"),
            _ => {}
        }
    };
    streaming.abort();
    (heard, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smart_turn_policy_does_not_cut_off_a_mid_thought_pause() {
    let audio = said_with_a_pause();
    // Under the fixed silence, 700 ms is the end of the turn: the person is cut off after
    // "to".
    let (heard, _server) = first_turn_heard(audio.clone(), &[]).await;
    let words = heard.to_lowercase();
    assert!(
        words.contains("flight") && !words.contains("london"),
        "under the silence policy the first turn is {heard:?}"
    );
    // The end-of-turn model hears an unfinished sentence at the pause: one turn, all of it.
    let (heard, server) = first_turn_heard(audio, &[("ATLAS_TURN_POLICY", "smart")]).await;
    let words = heard.to_lowercase();
    assert!(
        words.contains("flight") && words.contains("london"),
        "under the smart policy the first turn is {heard:?}"
    );
    // The model was asked, and answered (perhaps after the maximum silence, on a slow
    // debug build).
    let decided = async {
        loop {
            let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let ok = metrics
                .lines()
                .find(|l| l.starts_with("atlas_turn_decisions_total{outcome=\"ok\"}"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok());
            if ok.is_some_and(|n| n >= 1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), decided)
        .await
        .expect("the end-of-turn model answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_by_the_token_cap_still_ends_on_a_complete_sentence() {
    let llm = llm_worker(2).await;
    for (max_tokens, soft_max_tokens) in [(12, 6), (24, 12), (64, 32)] {
        let provider = atlas_local::llm::LocalLlm::new(
            llm.clone(),
            "smollm2",
            atlas_local::llm::Decoding {
                max_tokens,
                soft_max_tokens,
                ..Default::default()
            },
        );
        let mut stream = provider
            .stream(LlmRequest {
                system: "You are a storyteller. Tell long, detailed stories.".into(),
                messages: vec![ChatMessage::user(
                    "Tell me a long story about a dragon who learns to bake bread.",
                )],
                max_tokens: 256,
                ..LlmRequest::default()
            })
            .await
            .unwrap();
        let mut reply = String::new();
        let mut output_tokens = 0;
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                LlmEvent::Delta(text) => reply.push_str(&text),
                LlmEvent::Usage(u) => output_tokens = u.output_tokens.unwrap_or(0),
                _ => {}
            }
        }
        assert!(!reply.trim().is_empty(), "cap {max_tokens}: empty reply");
        assert!(
            ends_a_sentence(&reply),
            "cap {max_tokens}: {reply:?} does not end a sentence"
        );
        assert!(
            output_tokens <= u64::from(max_tokens),
            "cap {max_tokens}: {output_tokens} tokens"
        );
    }
}

#[tokio::test]
async fn espeak_speaks_and_refuses_unknown_voices() {
    let tts = Espeak::new("espeak-ng", "en-us", 175, 2).await.unwrap();
    assert_eq!(tts.sample_rate(), ESPEAK_RATE);
    assert!(tts.has_voice("en-gb") && !tts.has_voice("klingon"));
    let stream = tts
        .synthesize(TtsRequest {
            text: "Paris is the capital of France.".into(),
            voice: None,
        })
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    let seconds = bytes as f64 / 2.0 / ESPEAK_RATE as f64;
    assert!((1.0..5.0).contains(&seconds), "{seconds:.2} s of speech");
    assert_refuses_unknown_voice(&tts).await;
    let err = Espeak::new("/nonexistent/espeak-ng", "en-us", 175, 1)
        .await
        .expect_err("missing program");
    assert!(
        err.to_string().contains("apt-get install -y espeak-ng"),
        "{err}"
    );
}

/// `atlas-voice llm-server` on the pinned SmolLM2, on a free loopback port.
struct LlmServer {
    _child: atlas_testkit::KillOnDrop,
    base: String,
}

fn llm_server() -> LlmServer {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args(["llm-server", "--listen", "127.0.0.1:0", "--threads", "1"])
        .env("ATLAS_MODELS_DIR", models_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("llm-server prints its address")
            .unwrap();
        if let Some(url) = line.strip_prefix("atlas-voice llm-server listening on ") {
            break url.trim().to_string();
        }
    };
    LlmServer {
        _child: atlas_testkit::KillOnDrop(child),
        base,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_openai_compatible_server_is_one_setting_away() {
    let llm = llm_server();
    let url = format!("{}/chat/completions", llm.base);
    let post = |body: serde_json::Value| reqwest::Client::new().post(&url).json(&body).send();

    // The endpoint itself: a plain answer, and a refusal in OpenAI's error shape.
    let answer = post(serde_json::json!({
        "model": "any",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 24,
    }));
    let answer: serde_json::Value = answer.await.unwrap().json().await.unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(ends_a_sentence(text), "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let refused = post(serde_json::json!({
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }))
    .await
    .unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("tools"));

    // The voice server pointed at it with ATLAS_LLM=openai answers a typed question through
    // it (the adapter streams with usage).
    let server = serve(&[
        ("ATLAS_LLM", "openai"),
        ("ATLAS_OPENAI_CHAT_URL", &llm.base),
        ("ATLAS_LLM_MODEL", "SmolLM2-135M-Instruct.Q4_1"),
        // Served on this machine: priced as free, so the default budget still applies.
        ("ATLAS_OPENAI_CHAT_PROVIDER", "local"),
    ])
    .expect("serve starts against the local OpenAI-compatible server");
    let mut conn = session(&server).await;
    conn.sender
        .send(&ClientMessage::InputText {
            text: "What colour is the sky on a clear day?".into(),
        })
        .await
        .unwrap();
    let turn = collect_turn(&mut conn).await;
    assert!(turn.errors.is_empty(), "errors {:?}", turn.errors);
    assert!(ends_a_sentence(&turn.reply), "reply {:?}", turn.reply);
    assert!(!turn.audio.is_empty(), "the reply was spoken");
}

/// A phone call on the local engines: the question as μ-law at 8 kHz through the fake Twilio,
/// the answer played back as μ-law, and the answer transcribes back to words of the question's
/// topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_call_on_the_local_engines_gets_an_answer_that_transcribes_back() {
    use atlas_fakes::twilio::CallConfig;
    const AUTH: &str = "local-engines-twilio-token-0123456789";
    const PUBLIC: &str = "https://voice.example.com";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("atlas.toml");
    std::fs::write(
        &config,
        "[[twilio_numbers]]\nnumber = \"+12025550199\"\nuser_id = \"caller\"\n",
    )
    .unwrap();
    let prompt = "You are a helpful voice assistant. Answer the question directly in one short, \
                  correct sentence. Example: Q: What is the capital of Spain? A: The capital of \
                  Spain is Madrid.";
    let server = serve(&[
        ("ATLAS_LOCAL_SYSTEM_PROMPT", prompt),
        ("ATLAS_TWILIO_AUTH_TOKEN", AUTH),
        ("ATLAS_PUBLIC_URL", PUBLIC),
        ("ATLAS_CONFIG", config.to_str().unwrap()),
    ])
    .expect("serve starts on the local engines");
    // The question at 8 kHz, as a phone line carries it.
    let question = atlas_testkit::phone_line(&spoken_question());
    let base = server
        .url()
        .replace("ws://", "http://")
        .replace("/v1/voice", "");
    let mut cfg = CallConfig::new(base, PUBLIC, AUTH);
    cfg.to = "+12025550199".into();
    cfg.audio = question;
    cfg.trailing_silence = Duration::from_secs(25);
    let report = atlas_testkit::answered_call(cfg, Duration::from_millis(500)).await;
    // What the caller heard, back at 16 kHz for the recogniser.
    let heard: Vec<i16> = report.heard.iter().flat_map(|&s| [s, s]).collect();
    let stt = LocalStt::new(
        stt_worker(2).await,
        "whisper-tiny.en",
        EndpointConfig::default(),
        None,
    );
    let back = stt.transcribe(&heard, Some("en".into())).await.unwrap();
    let back = words(&back);
    assert!(
        back.len() >= 3,
        "the answer on the phone came back as {back:?}"
    );
}

/// What a loudspeaker client saw of the first turn and the few seconds after it.
struct Loudspeaker {
    /// `response.done` of turn 1 said it was interrupted.
    interrupted: bool,
    /// Turns the server started after the first.
    more_turns: Vec<u64>,
    /// Seconds of reply audio played (and heard back).
    played: f64,
    /// The reply's words, and the transcripts shown after the question's.
    reply: String,
    heard: Vec<String>,
}

/// A client on its loudspeaker without echo cancellation, on a server with `env`: it asks the
/// spoken question, and from then on its microphone picks up exactly what it plays, 20 ms at
/// a time in real time; it watches turn 1 and 4 s after it.
async fn loudspeaker_session(env: &[(&str, &str)]) -> Loudspeaker {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    let server = serve(env).expect("serve starts on the local engines");
    let mut conn = session(&server).await;
    let room: Arc<Mutex<VecDeque<i16>>> = Arc::default();
    let microphone = {
        let (sender, room) = (conn.sender.clone(), room.clone());
        tokio::spawn(async move {
            let question = spoken_question();
            let mut said = question.chunks(320);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            // 60 s at most.
            for _ in 0..3_000 {
                tick.tick().await;
                let frame: Vec<i16> = match said.next() {
                    Some(chunk) => chunk.to_vec(),
                    None => {
                        let mut room = room.lock().unwrap();
                        (0..320).map(|_| room.pop_front().unwrap_or(0)).collect()
                    }
                };
                let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
                if sender.audio(Bytes::from(bytes)).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut seen = Loudspeaker {
        interrupted: false,
        more_turns: Vec::new(),
        played: 0.0,
        reply: String::new(),
        heard: Vec::new(),
    };
    let mut until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut done = false;
    while let Ok(Some(incoming)) = tokio::time::timeout_at(until, conn.incoming.recv()).await {
        match incoming {
            Incoming::Audio { pcm, .. } => {
                let samples: Vec<i16> = pcm
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect();
                seen.played += samples.len() as f64 / 16_000.0;
                room.lock().unwrap().extend(samples);
            }
            Incoming::Event { event, .. } => match event {
                ServerEvent::ResponseStarted { turn_id } if turn_id > 1 => {
                    seen.more_turns.push(turn_id)
                }
                ServerEvent::ResponseTextDelta { turn_id: 1, text } => seen.reply.push_str(&text),
                ServerEvent::TranscriptPartial { text }
                | ServerEvent::TranscriptFinal { text, .. }
                    if !seen.reply.is_empty() =>
                {
                    seen.heard.push(text)
                }
                ServerEvent::ResponseDone {
                    turn_id: 1,
                    interrupted,
                    ..
                } if !done => {
                    done = true;
                    seen.interrupted = interrupted;
                    // What is still playing comes back, and is transcribed after it.
                    until = tokio::time::Instant::now() + Duration::from_secs(4);
                }
                ServerEvent::Error { code, .. } => panic!("error {code:?}"),
                _ => {}
            },
            Incoming::Closed { code, reason, .. } => panic!("closed {code:?}: {reason}"),
        }
    }
    microphone.abort();
    assert!(done, "turn 1 finished within a minute");
    seen
}

/// The assistant's voice, played on a loudspeaker and picked up by the microphone, heard by
/// the local recogniser: with the echo guard (`ATLAS_ECHO_WINDOW_MS`) the reply plays to its
/// end and the echo makes no turn; without it, the same echo cuts the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assistants_voice_from_a_loudspeaker_does_not_interrupt_it() {
    let prompt = "You are a helpful voice assistant. Answer the question directly in two short, \
                  correct sentences. Example: Q: What is the capital of Spain? A: The capital \
                  of Spain is Madrid. It is in the middle of the country.";
    // Partials at the default cadence: Whisper's guess at less speech is often wrong words
    // ("terraces of city" for "Paris is a city"), which the guard cannot tell from a person.
    let env = |window| {
        [
            ("ATLAS_LOCAL_SYSTEM_PROMPT", prompt),
            ("ATLAS_ECHO_WINDOW_MS", window),
        ]
    };
    let guarded = loudspeaker_session(&env("1000")).await;
    assert!(
        !guarded.interrupted && guarded.more_turns.is_empty(),
        "with the guard: interrupted {}, more turns {:?}; reply {:?}, heard {:?}",
        guarded.interrupted,
        guarded.more_turns,
        guarded.reply,
        guarded.heard
    );
    assert!(
        guarded.played >= 1.0,
        "{} s of reply played",
        guarded.played
    );
    let unguarded = loudspeaker_session(&env("0")).await;
    assert!(
        unguarded.interrupted,
        "without the guard the echo cuts the reply ({} s played, more turns {:?})",
        unguarded.played, unguarded.more_turns
    );
}
