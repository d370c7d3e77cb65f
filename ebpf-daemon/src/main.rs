mod lineproto;
fn main() {}
