pub fn parse_request(_d: &[u8]) {}
