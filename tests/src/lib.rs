//! Test support for vmlb: network namespaces, a packet builder, and the fixture runner that
//! drives the real XDP program through BPF_PROG_TEST_RUN.

pub mod bench;
pub mod daemon;
pub mod fixture;
pub mod fixture6;
pub mod lab;
pub mod load;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod prev_layout;
