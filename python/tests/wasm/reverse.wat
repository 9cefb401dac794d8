;; A WASI command that writes its stdin to stdout reversed, byte by byte.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 17)
  ;; An iovec at 0, the count of bytes read or written at 8, data from 1024.
  (func (export "_start")
    (local $total i32) (local $n i32) (local $i i32) (local $j i32) (local $t i32)
    (block $done
      (loop $read
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $total)))
        (i32.store (i32.const 4) (i32.sub (i32.const 1048576) (local.get $total)))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $total (i32.add (local.get $total) (local.get $n)))
        (br $read)))
    (local.set $i (i32.const 1024))
    (local.set $j (i32.sub (i32.add (i32.const 1024) (local.get $total)) (i32.const 1)))
    (block $reversed
      (loop $swap
        (br_if $reversed (i32.ge_s (local.get $i) (local.get $j)))
        (local.set $t (i32.load8_u (local.get $i)))
        (i32.store8 (local.get $i) (i32.load8_u (local.get $j)))
        (i32.store8 (local.get $j) (local.get $t))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (local.set $j (i32.sub (local.get $j) (i32.const 1)))
        (br $swap)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get $total))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
