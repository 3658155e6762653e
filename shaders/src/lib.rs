//! Custom CubeCL kernels for cogview. Each is a `#[cube]` function (so it compiles to WGSL,
//! SPIR-V and MSL, whichever compiler the adapter got), launched through a burn backend
//! extension (so it runs under burn's fusion like any other op), beside a plain-burn reference
//! and a parity test.

pub mod bf16;
