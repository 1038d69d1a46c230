//! A minimal "kernel" that real Firecracker can boot on x86-64.
//!
//! Tests and demos need a kernel image that works with both the stand-in
//! and real Firecracker, and the hosts this project runs on cannot boot a
//! stock Linux guest. This is the smallest thing that behaves like a guest
//! from the outside: it writes a greeting to the serial console, waits for
//! `SendCtrlAltDel`, and then asks the i8042 controller for a CPU reset,
//! which makes Firecracker exit with status 0, just as a Linux guest booted
//! with `reboot=k` does.
//!
//! The image is an ELF64 executable with one `PT_LOAD` segment covering the
//! whole file at guest-physical 0x100000 (Firecracker's `HIMEM_START`,
//! which its ELF loader requires `e_entry` to be at or above). Firecracker
//! enters it in 64-bit long mode with the low memory identity-mapped and
//! `RFLAGS` = 2 (so the direction flag is clear), which is all this code
//! relies on. The code, hand-assembled:
//!
//! ```text
//!  0: 66 ba f8 03        mov  dx, 0x3f8           ; COM1 data port
//!  4: 48 8d 35 rel32     lea  rsi, [rip+hello]
//! 11: ac             1:  lodsb
//! 12: 84 c0              test al, al
//! 14: 74 03              jz   2f
//! 16: ee                 out  dx, al
//! 17: eb f8              jmp  1b
//! 19: e4 64          2:  in   al, 0x64            ; i8042 status
//! 21: a8 01              test al, 1               ; output buffer full?
//! 23: 75 04              jnz  3f
//! 25: f3 90              pause
//! 27: eb f6              jmp  2b
//! 29: 48 8d 35 rel32 3:  lea  rsi, [rip+reset]
//! 36: ac             4:  lodsb
//! 37: 84 c0              test al, al
//! 39: 74 03              jz   5f
//! 41: ee                 out  dx, al
//! 42: eb f8              jmp  4b
//! 44: b0 fe          5:  mov  al, 0xfe            ; "pulse reset line"
//! 46: e6 64              out  0x64, al
//! 48: f4             6:  hlt
//! 49: eb fd              jmp  6b
//! 51: hello\0 reset\0
//! ```

/// What the guest writes to its serial console once it runs.
pub const GUEST_HELLO: &str = "hearth test guest: hello from a kernel-less guest\n\
hearth test guest: no kernel, no init; waiting for Ctrl+Alt+Del on the i8042 keyboard controller\n";

/// What the guest writes when Ctrl+Alt+Del arrives, before it resets.
pub const GUEST_RESET: &str =
    "hearth test guest: Ctrl+Alt+Del received; resetting through the i8042 (0xFE)\n";

/// Guest-physical (and virtual) load address of the image.
pub const LOAD_ADDR: u64 = 0x10_0000;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// File offset of the code: right after the headers.
pub const CODE_OFFSET: usize = EHDR_SIZE + PHDR_SIZE;

/// The code, with both `lea` displacements zero (patched in [`test_guest_elf`]).
const CODE: [u8; 51] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x48, 0x8d, 0x35, 0, 0, 0, 0,    // lea rsi, [rip+hello]
    0xac, // lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz +3
    0xee, // out dx, al
    0xeb, 0xf8, // jmp -8
    0xe4, 0x64, // in al, 0x64
    0xa8, 0x01, // test al, 1
    0x75, 0x04, // jnz +4
    0xf3, 0x90, // pause
    0xeb, 0xf6, // jmp -10
    0x48, 0x8d, 0x35, 0, 0, 0, 0,    // lea rsi, [rip+reset]
    0xac, // lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz +3
    0xee, // out dx, al
    0xeb, 0xf8, // jmp -8
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp -3
];
/// Code offset of the first `lea`'s displacement, and of the instruction after it.
const LEA_HELLO: (usize, usize) = (7, 11);
/// Same for the second `lea`.
const LEA_RESET: (usize, usize) = (32, 36);

fn rel32(target: usize, next_insn: usize) -> [u8; 4] {
    // Both are offsets within a few hundred bytes; the cast cannot wrap.
    ((target as i64 - next_insn as i64) as i32).to_le_bytes()
}

/// The test guest image: a tiny x86-64 ELF executable that Firecracker
/// boots (see the module documentation).
pub fn test_guest_elf() -> Vec<u8> {
    let hello_at = CODE.len();
    let reset_at = hello_at + GUEST_HELLO.len() + 1;
    let mut code = CODE.to_vec();
    code[LEA_HELLO.0..LEA_HELLO.0 + 4].copy_from_slice(&rel32(hello_at, LEA_HELLO.1));
    code[LEA_RESET.0..LEA_RESET.0 + 4].copy_from_slice(&rel32(reset_at, LEA_RESET.1));
    code.extend_from_slice(GUEST_HELLO.as_bytes());
    code.push(0);
    code.extend_from_slice(GUEST_RESET.as_bytes());
    code.push(0);

    let file_len = (CODE_OFFSET + code.len()) as u64;
    let mut elf = Vec::with_capacity(CODE_OFFSET + code.len());
    // Elf64_Ehdr
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F']);
    elf.push(2); // EI_CLASS: ELFCLASS64
    elf.push(1); // EI_DATA: ELFDATA2LSB
    elf.push(1); // EI_VERSION: EV_CURRENT
    elf.push(0); // EI_OSABI: System V
    elf.extend_from_slice(&[0; 8]); // EI_ABIVERSION + padding
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(LOAD_ADDR + CODE_OFFSET as u64).to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // Elf64_Phdr
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    debug_assert_eq!(elf.len(), CODE_OFFSET);
    elf.extend_from_slice(&code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn elf_header_fields() {
        let elf = test_guest_elf();
        assert_eq!(&elf[0..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(&elf, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&elf, 18), 62, "EM_X86_64");
        assert_eq!(u64_at(&elf, 24), 0x100000 + CODE_OFFSET as u64, "e_entry");
        assert_eq!(u64_at(&elf, 32), 64, "e_phoff");
        assert_eq!(u16_at(&elf, 52), 64, "e_ehsize");
        assert_eq!(u16_at(&elf, 54), 56, "e_phentsize");
        assert_eq!(u16_at(&elf, 56), 1, "e_phnum");
        // The checks Firecracker's ELF loader (linux-loader 0.13) makes.
        assert!(u64_at(&elf, 24) >= 0x100000);
        assert!(u64_at(&elf, 32) >= 64);
    }

    #[test]
    fn program_header_fields() {
        let elf = test_guest_elf();
        let ph = 64;
        assert_eq!(u32_at(&elf, ph), 1, "PT_LOAD");
        assert_eq!(u32_at(&elf, ph + 4), 5, "R+X");
        assert_eq!(u64_at(&elf, ph + 8), 0, "p_offset");
        assert_eq!(u64_at(&elf, ph + 16), 0x100000, "p_vaddr");
        assert_eq!(u64_at(&elf, ph + 24), 0x100000, "p_paddr");
        assert_eq!(u64_at(&elf, ph + 32), elf.len() as u64, "p_filesz");
        assert_eq!(u64_at(&elf, ph + 40), elf.len() as u64, "p_memsz");
        let align = u64_at(&elf, ph + 48);
        assert_eq!(0x100000 % align, 0, "p_vaddr = p_offset mod p_align");
    }

    /// What the interpreter saw the guest do.
    #[derive(Debug, Default)]
    struct Run {
        serial: Vec<u8>,
        i8042_writes: Vec<u8>,
        halted: bool,
    }

    /// Executes the image's code on a tiny interpreter that knows exactly
    /// the instructions it uses, with the i8042 reporting an empty output
    /// buffer `polls_before_key` times and then a full one. Decoding every
    /// instruction checks the byte encodings and every jump and `lea`
    /// displacement.
    fn run(polls_before_key: usize) -> Run {
        let image = test_guest_elf();
        let mem_base = u64_at(&image, 64 + 24); // p_paddr; p_offset is 0
        let at = |addr: u64| -> u8 { image[(addr - mem_base) as usize] };
        let mut rip = u64_at(&image, 24);
        let (mut al, mut dx, mut rsi, mut zf) = (0u8, 0u16, 0u64, false);
        let mut polls = 0;
        let mut out = Run::default();
        let rel8 = |rip: u64, d: u8| rip.wrapping_add_signed(i64::from(d as i8));
        for _ in 0..100_000 {
            let op = at(rip);
            match op {
                0x66 => {
                    assert_eq!(at(rip + 1), 0xba, "only mov dx, imm16");
                    dx = u16::from_le_bytes([at(rip + 2), at(rip + 3)]);
                    rip += 4;
                }
                0x48 => {
                    assert_eq!((at(rip + 1), at(rip + 2)), (0x8d, 0x35), "only lea rsi");
                    let d =
                        i32::from_le_bytes([at(rip + 3), at(rip + 4), at(rip + 5), at(rip + 6)]);
                    rip += 7;
                    rsi = rip.wrapping_add_signed(i64::from(d));
                }
                0xac => {
                    al = at(rsi);
                    rsi += 1;
                    rip += 1;
                }
                0x84 => {
                    assert_eq!(at(rip + 1), 0xc0, "only test al, al");
                    zf = al == 0;
                    rip += 2;
                }
                0xa8 => {
                    zf = al & at(rip + 1) == 0;
                    rip += 2;
                }
                0x74 | 0x75 | 0xeb => {
                    let taken = match op {
                        0x74 => zf,
                        0x75 => !zf,
                        _ => true,
                    };
                    let next = rip + 2;
                    rip = if taken { rel8(next, at(rip + 1)) } else { next };
                }
                0xee => {
                    assert_eq!(dx, 0x3f8, "serial writes go to COM1");
                    out.serial.push(al);
                    rip += 1;
                }
                0xe4 => {
                    assert_eq!(at(rip + 1), 0x64, "only the i8042 status port is read");
                    polls += 1;
                    al = if polls > polls_before_key { 0x01 } else { 0x00 };
                    rip += 2;
                }
                0xf3 => {
                    assert_eq!(at(rip + 1), 0x90, "only pause");
                    rip += 2;
                }
                0xb0 => {
                    al = at(rip + 1);
                    rip += 2;
                }
                0xe6 => {
                    assert_eq!(at(rip + 1), 0x64, "only the i8042 command port is written");
                    out.i8042_writes.push(al);
                    rip += 2;
                }
                0xf4 => {
                    out.halted = true;
                    return out;
                }
                other => panic!("unknown opcode {other:#04x} at {rip:#x}"),
            }
        }
        out
    }

    #[test]
    fn guest_prints_waits_and_resets() {
        for polls in [0, 1, 5] {
            let r = run(polls);
            let expected = format!("{GUEST_HELLO}{GUEST_RESET}");
            assert_eq!(String::from_utf8(r.serial).unwrap(), expected);
            assert_eq!(r.i8042_writes, vec![0xfe], "CPU reset command");
            assert!(r.halted);
        }
    }

    #[test]
    fn guest_waits_while_no_key_is_pending() {
        // With a key that never comes, the guest keeps polling and never resets.
        let r = run(usize::MAX);
        assert_eq!(String::from_utf8(r.serial).unwrap(), GUEST_HELLO);
        assert!(r.i8042_writes.is_empty());
        assert!(!r.halted);
    }

    #[test]
    fn final_jump_loops_back_to_hlt() {
        let elf = test_guest_elf();
        let hlt = CODE_OFFSET + 48;
        assert_eq!(elf[hlt], 0xf4);
        assert_eq!(elf[hlt + 1], 0xeb);
        let target = (hlt + 3) as i64 + i64::from(elf[hlt + 2] as i8);
        assert_eq!(target, hlt as i64);
    }
}
