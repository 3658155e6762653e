//! Link options for a smaller release binary on x86-64 Linux (glibc), where rustc links with its
//! own LLD by default (since Rust 1.90; cogview needs 1.95). A build that swaps in GNU ld would
//! have to drop `--icf=all`, which that linker lacks.
//!
//! - `--icf=all`: folds identical functions. CubeCL expands the same kernel-building code for
//!   many element types and configurations, and much of it compiles to identical machine code.
//!   Rust gives function addresses no identity, so folding them is sound.
//! - `-no-pie`: a position-dependent executable, as Go builds by default. A position-independent
//!   one carries a load-time relocation for every pointer in its tables (vtables, CubeCL's
//!   static kernel descriptions): about 9 MB of this binary. The libraries it loads (libc,
//!   the Vulkan loader and drivers) keep their address randomisation.
//!
//! Only release builds of the `cogview` binary: tests and debug builds link as usual.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = |key: &str, value: &str| std::env::var(key).as_deref() == Ok(value);
    // x86_64-unknown-linux-gnu, the target whose default linker is rustc's LLD.
    let linux_gnu_x86_64 = target("CARGO_CFG_TARGET_OS", "linux")
        && target("CARGO_CFG_TARGET_ARCH", "x86_64")
        && target("CARGO_CFG_TARGET_ENV", "gnu");
    if linux_gnu_x86_64 && target("PROFILE", "release") {
        println!("cargo:rustc-link-arg-bin=cogview=-Wl,--icf=all");
        println!("cargo:rustc-link-arg-bin=cogview=-no-pie");
    }
}
