;; A policy written by hand to test the sandbox's limits: it routes every
;; message to this cell's own application, except two methods.
;;
;; - `grow-memory` grows its own linear memory to 12 MiB. A second core
;;   module already holds another 12 MiB, so each memory alone stays under a
;;   16 MiB cap while together they pass it.
;; - `grow-table` grows a table until something stops it.
;;
;; It is a component of world `cellhost:policy/policy@0.1.0` in text form;
;; wasmtime compiles the text directly, so no build step is needed.
(component
  (type $types-instance
    (instance
      (type $message-type (enum "targeted" "broadcast" "response"))
      (export "message-type" (type $message-type-e (eq $message-type)))
      (type $direction (enum "up" "down"))
      (export "direction" (type $direction-e (eq $direction)))
      (type $message
        (record
          (field "uuid" string)
          (field "message-type" $message-type-e)
          (field "direction" $direction-e)
          (field "method-name" string)
          (field "routing-path" string)
          (field "hop-count" u32)
          (field "max-hop-count" u32)
          (field "target-cell" (option string))
          (field "need-response" bool)
          (field "fanout" bool)
          (field "is-origin" bool)
          (field "run-locally" bool)
          (field "ctxt" string)
          (field "method-kwargs" string)))
      (export "message" (type $message-e (eq $message)))
      (type $neighbour
        (record
          (field "name" string)
          (field "is-parent" bool)
          (field "weight-offset" f64)
          (field "weight-scale" f64)
          (field "capabilities" (list (tuple string (list string))))))
      (export "neighbour" (type $neighbour-e (eq $neighbour)))
      (type $cell
        (record
          (field "name" string)
          (field "parents" (list $neighbour-e))
          (field "children" (list $neighbour-e))))
      (export "cell" (type $cell-e (eq $cell)))
      (type $failure (record (field "class" string) (field "message" string)))
      (export "failure" (type $failure-e (eq $failure)))
      (type $action
        (variant
          (case "process-here")
          (case "relay" string)
          (case "reply-error" $failure-e)
          (case "drop" string)))
      (export "action" (type (eq $action)))))
  (import "cellhost:policy/types@0.1.0" (instance $types (type $types-instance)))
  (alias export $types "message" (type $message))
  (alias export $types "cell" (type $cell))
  (alias export $types "action" (type $action))

  ;; Holds 12 MiB from the start and does nothing else.
  (core module $ballast
    (memory (export "memory") 192))
  (core instance $ballast (instantiate $ballast))

  (core module $policy
    (memory $main (export "memory") 1)
    (table $spare 1 funcref)
    ;; Where the host's copies of strings and records go; reset after each call.
    (global $next (mut i32) (i32.const 1024))
    ;; The two method names that misbehave.
    (data (i32.const 64) "grow-memory")
    (data (i32.const 80) "grow-table")

    (func (export "realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
      (local $at i32)
      (local.set $at
        (i32.and
          (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (global.set $next (i32.add (local.get $at) (local.get $size)))
      (if (i32.gt_u (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
        (then
          (drop (memory.grow
            (i32.add (i32.shr_u (i32.sub (global.get $next) (i32.mul (memory.size) (i32.const 65536))) (i32.const 16))
                     (i32.const 1))))))
      (local.get $at))

    ;; Whether the `len` bytes at `at` are the `want_len` bytes at `want`.
    (func $same (param $at i32) (param $len i32) (param $want i32) (param $want_len i32) (result i32)
      (local $i i32)
      (if (i32.ne (local.get $len) (local.get $want_len)) (then (return (i32.const 0))))
      (block $differ
        (loop $next_byte
          (if (i32.eq (local.get $i) (local.get $len)) (then (return (i32.const 1))))
          (br_if $differ
            (i32.ne (i32.load8_u (i32.add (local.get $at) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $want) (local.get $i)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next_byte)))
      (i32.const 0))

    ;; `init(config) -> result<_, string>`: always ok.
    (func (export "init") (param i32 i32) (result i32)
      (global.set $next (i32.const 1024))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.const 16))

    ;; `route(message, cell) -> result<list<action>, string>`; the arguments
    ;; arrive as one record in memory, `method-name` at offset 12.
    (func (export "route") (param $args i32) (result i32)
      (local $name i32)
      (local $len i32)
      (local.set $name (i32.load offset=12 (local.get $args)))
      (local.set $len (i32.load offset=16 (local.get $args)))
      (if (call $same (local.get $name) (local.get $len) (i32.const 64) (i32.const 11))
        (then (drop (memory.grow (i32.sub (i32.const 192) (memory.size))))))
      (if (call $same (local.get $name) (local.get $len) (i32.const 80) (i32.const 10))
        (then
          (loop $more
            (drop (table.grow $spare (ref.null func) (i32.const 65536)))
            (br $more))))
      (global.set $next (i32.const 1024))
      ;; ok([process-here]): the action at 32, the result at 16.
      (i32.store8 (i32.const 32) (i32.const 0))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store offset=4 (i32.const 16) (i32.const 32))
      (i32.store offset=8 (i32.const 16) (i32.const 1))
      (i32.const 16)))
  (core instance $policy (instantiate $policy))

  (alias core export $policy "memory" (core memory $memory))
  (alias core export $policy "realloc" (core func $realloc))
  (func (export "init") (param "config" string) (result (result (error string)))
    (canon lift (core func $policy "init") (memory $memory) (realloc $realloc) string-encoding=utf8))
  (func (export "route") (param "message" $message) (param "cell" $cell)
    (result (result (list $action) (error string)))
    (canon lift (core func $policy "route") (memory $memory) (realloc $realloc) string-encoding=utf8)))
