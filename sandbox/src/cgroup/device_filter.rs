//! The cgroup v2 device filter: v2 has no `devices.allow`; the kernel asks
//! a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup instead.
//!
//! The program is a handful of instructions, assembled here by hand rather
//! than through a BPF library (no compiler, no ELF loader, no extra
//! dependency): load the device type, major and minor from the context, and
//! for each allowed device compare and return 1; fall through to return 0
//! (deny). Access (read, write, mknod) is not inspected: every rule grants
//! all three, as the v1 rules (`rwm`) do.
//!
//! It is attached with `BPF_F_ALLOW_MULTI`, so a program attached later
//! below the slot can only narrow access further: the kernel runs every
//! program on the path and grants access only if all of them do.

use std::{
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::Path,
};

use super::{devices::DeviceRule, CgroupError};

/// One eBPF instruction, laid out as the kernel's `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4` as C bit-fields lay them out.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcode parts, from include/uapi/linux/bpf_common.h and bpf.h.
const BPF_LDX: u8 = 0x01;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_W: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_K: u8 = 0x00;
const BPF_AND: u8 = 0x50;
const BPF_MOV: u8 = 0xb0;
const BPF_JNE: u8 = 0x50;
const BPF_EXIT: u8 = 0x90;

// Registers: r0 holds the return value, r1 the context on entry.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R4: u8 = 4;
const R5: u8 = 5;

// `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`,
// where access_type is `(access << 16) | device type`.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;
const BPF_DEVCG_DEV_CHAR: i32 = 2;

// bpf(2) commands, program and attach types, flags.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        // C bit-fields are allocated from the least significant bit on
        // little-endian targets and from the most significant on big-endian.
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Insn { code, regs, off, imm }
    }

    /// `dst = *(u32 *)(src + off)`
    fn load_u32(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(BPF_LDX | BPF_MEM | BPF_W, dst, src, off, 0)
    }

    /// `dst &= imm`
    fn and(dst: u8, imm: i32) -> Insn {
        Insn::new(BPF_ALU64 | BPF_AND | BPF_K, dst, 0, 0, imm)
    }

    /// `dst = imm`
    fn mov(dst: u8, imm: i32) -> Insn {
        Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, dst, 0, 0, imm)
    }

    /// `if dst != imm goto pc + 1 + off`
    fn jump_if_not_equal(dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(BPF_JMP | BPF_JNE | BPF_K, dst, 0, off, imm)
    }

    fn exit() -> Insn {
        Insn::new(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
    }

    /// The instruction's bytes in the kernel's layout (native byte order).
    #[cfg(test)]
    pub(super) fn to_bytes(self) -> [u8; 8] {
        let mut bytes = [0; 8];
        bytes[0] = self.code;
        bytes[1] = self.regs;
        bytes[2..4].copy_from_slice(&self.off.to_ne_bytes());
        bytes[4..8].copy_from_slice(&self.imm.to_ne_bytes());
        bytes
    }
}

/// An immediate for a major or minor number. The loaded values are u32
/// zero-extended to 64 bits and the comparison is 64-bit against the
/// sign-extended immediate, so a number above `i32::MAX` (no real device
/// has one) can never match: it denies, it does not widen.
fn imm(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(-1)
}

/// Assembles the filter: allow the listed character devices, deny the rest.
pub(super) fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut insns = vec![
        Insn::load_u32(R2, R1, CTX_ACCESS_TYPE),
        Insn::and(R2, 0xffff),
        Insn::load_u32(R4, R1, CTX_MAJOR),
        Insn::load_u32(R5, R1, CTX_MINOR),
    ];
    for rule in rules {
        let mut tests = vec![(R2, BPF_DEVCG_DEV_CHAR), (R4, imm(rule.major))];
        if let Some(minor) = rule.minor {
            tests.push((R5, imm(minor)));
        }
        // Each failed test skips the rest of this rule's block: the tests
        // after it, then `r0 = 1` and `exit`.
        let n = tests.len();
        for (i, (reg, value)) in tests.into_iter().enumerate() {
            // At most 3 tests, so the offset is at most 4.
            insns.push(Insn::jump_if_not_equal(reg, value, (n - i - 1 + 2) as i16));
        }
        insns.push(Insn::mov(R0, 1));
        insns.push(Insn::exit());
    }
    insns.push(Insn::mov(R0, 0));
    insns.push(Insn::exit());
    insns
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to
/// `expected_attach_type`; the kernel zero-fills the fields after it.
#[repr(C)]
#[derive(Default)]
pub(super) struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
pub(super) struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads the filter for `rules` and attaches it to the cgroup `dir`.
pub(super) fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), CgroupError> {
    let failed = |step, source, verifier_log| CgroupError::DeviceFilter {
        path: dir.into(),
        step,
        source,
        verifier_log,
    };
    let insns = program(rules);
    let prog = load(&insns).map_err(|(source, log)| failed("BPF_PROG_LOAD", source, log))?;
    let cgroup = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|source| failed("opening the cgroup directory", source, String::new()))?;
    let attr = ProgAttachAttr {
        target_fd: fd_u32(cgroup.as_raw_fd()),
        attach_bpf_fd: fd_u32(prog.as_raw_fd()),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of `attr`, a live, fully initialised
    // #[repr(C)] struct laid out like the kernel's; both descriptors in it
    // are open (owned by `cgroup` and `prog`, alive until after the call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>() as libc::c_uint,
        )
    };
    if r == -1 {
        return Err(failed("BPF_PROG_ATTACH", io::Error::last_os_error(), String::new()));
    }
    // The attachment holds its own reference to the program: closing ours
    // (dropping `prog`) leaves the filter in force until the cgroup is
    // removed.
    Ok(())
}

fn fd_u32(fd: i32) -> u32 {
    // An open descriptor is never negative.
    u32::try_from(fd).unwrap_or(u32::MAX)
}

/// Loads the program; on failure returns the error and the verifier's log.
fn load(insns: &[Insn]) -> Result<OwnedFd, (io::Error, String)> {
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"fleetmap_dev");
    let license = c"Apache-2.0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        // A filter has a few instructions per allowed device, far below u32.
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    let first = match prog_load(&attr) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // Load again with the verifier's log, to say why.
    let mut log = vec![0u8; 64 << 10];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    if let Ok(fd) = prog_load(&attr) {
        return Ok(fd);
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
    let log = if text.is_empty() {
        String::new()
    } else {
        format!("; verifier log:\n{text}")
    };
    Err((first, log))
}

fn prog_load(attr: &ProgLoadAttr) -> io::Result<OwnedFd> {
    // SAFETY: bpf(2) reads `size` bytes of `attr`, a live #[repr(C)] struct
    // laid out like the kernel's. The pointers in it are valid for the
    // duration of the call: `insns` to `insn_cnt` instructions and `license`
    // to a NUL-terminated string, both borrowed by the caller, and `log_buf`
    // (when set) to `log_size` writable bytes the caller owns. The kernel
    // copies what it needs and keeps no pointer after returning.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD returns a new descriptor that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn instructions_have_the_kernels_layout() {
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(offset_of!(Insn, off), 2);
        assert_eq!(offset_of!(Insn, imm), 4);
        // r2 = *(u32 *)(r1 + 4): BPF_LDX|BPF_MEM|BPF_W, dst 2, src 1.
        let load = Insn::load_u32(R2, R1, 4).to_bytes();
        if cfg!(target_endian = "little") {
            assert_eq!(load, [0x61, 0x12, 4, 0, 0, 0, 0, 0]);
            assert_eq!(Insn::and(R2, 0xffff).to_bytes(), [0x57, 0x02, 0, 0, 0xff, 0xff, 0, 0]);
            assert_eq!(Insn::mov(R0, 1).to_bytes(), [0xb7, 0x00, 0, 0, 1, 0, 0, 0]);
            assert_eq!(
                Insn::jump_if_not_equal(R4, 195, 3).to_bytes(),
                [0x55, 0x04, 3, 0, 195, 0, 0, 0]
            );
            assert_eq!(Insn::exit().to_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn the_attr_structs_match_union_bpf_attr() {
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_level), 24);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(offset_of!(ProgAttachAttr, attach_type), 8);
        assert_eq!(size_of::<ProgAttachAttr>(), 20);
    }

    #[test]
    fn each_rule_is_a_block_that_falls_through_to_deny() {
        let rules = [
            DeviceRule {
                major: 195,
                minor: Some(0),
            },
            DeviceRule {
                major: 136,
                minor: None,
            },
        ];
        let expected = vec![
            Insn::load_u32(R2, R1, 0),
            Insn::and(R2, 0xffff),
            Insn::load_u32(R4, R1, 4),
            Insn::load_u32(R5, R1, 8),
            // c 195:0: three tests; a failure skips to the next block.
            Insn::jump_if_not_equal(R2, 2, 4),
            Insn::jump_if_not_equal(R4, 195, 3),
            Insn::jump_if_not_equal(R5, 0, 2),
            Insn::mov(R0, 1),
            Insn::exit(),
            // c 136:*: two tests.
            Insn::jump_if_not_equal(R2, 2, 3),
            Insn::jump_if_not_equal(R4, 136, 2),
            Insn::mov(R0, 1),
            Insn::exit(),
            // Nothing matched: deny.
            Insn::mov(R0, 0),
            Insn::exit(),
        ];
        let program = program(&rules);
        assert_eq!(program, expected);
        // Every jump lands on the first test of the next block or on the
        // final deny, never past the end.
        for (pc, insn) in program.iter().enumerate() {
            if insn.code == BPF_JMP | BPF_JNE | BPF_K {
                let target = pc + 1 + insn.off as usize;
                assert!(target < program.len());
                assert!(
                    program[target].code == BPF_JMP | BPF_JNE | BPF_K
                        && program[target].regs == Insn::jump_if_not_equal(R2, 0, 0).regs
                        || target == program.len() - 2,
                    "jump at {pc} lands on {target}"
                );
            }
        }
    }

    #[test]
    fn numbers_beyond_i32_never_match() {
        assert_eq!(imm(7), 7);
        assert_eq!(imm(u32::MAX), -1);
    }
}
