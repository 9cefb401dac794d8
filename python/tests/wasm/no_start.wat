;; A module without the _start a WASI command needs.
(module (func (export "main")))
