//! The cost of a fresh WebAssembly instance per call: instantiate and run a
//! trivial WASI command, and one that reverses three bytes of stdin, in the
//! executor the slots use (pooling allocator, copy-on-write memory images,
//! `InstancePre`). The brief's target is well under 50 µs per call.

use std::time::Instant;

use fleetmap_runtime::wasm::{WasmConfig, WasmModule};

const TRIVIAL: &str = r#"(module (memory 1) (func (export "_start")))"#;

/// Reads stdin (up to 64 bytes) and writes it back reversed.
const REVERSER: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i32) (local $i i32) (local $t i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 64))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (block $done
      (loop $swap
        (br_if $done (i32.ge_s (local.get $i) (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1))))
        (local.set $t (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
        (i32.store8 (i32.add (i32.const 1024) (local.get $i))
          (i32.load8_u (i32.add (i32.const 1023) (i32.sub (local.get $n) (local.get $i)))))
        (i32.store8 (i32.add (i32.const 1023) (i32.sub (local.get $n) (local.get $i))) (local.get $t))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $swap)))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

fn main() -> anyhow::Result<()> {
    let config = || WasmConfig {
        memory_limit_bytes: 64 << 20,
        cache_dir: None,
        ..WasmConfig::default()
    };
    let trivial = WasmModule::new(TRIVIAL.as_bytes(), config())?;
    let reverser = WasmModule::new(REVERSER.as_bytes(), config())?;
    anyhow::ensure!(reverser.run(b"abc")? == b"cba", "the reverser reverses");
    for (name, module, input) in [
        ("trivial", &trivial, &b""[..]),
        ("reverser (3 bytes)", &reverser, &b"abc"[..]),
    ] {
        module.run(input)?;
        let n = 20_000;
        let start = Instant::now();
        for _ in 0..n {
            module.run(input)?;
        }
        let per_call = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("wasm {name}: fresh instance + run: {per_call:.1} µs per call ({n} calls)");
    }
    Ok(())
}
