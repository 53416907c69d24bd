pub struct Objects; pub struct Diagnostic; pub struct Origin; pub fn load_paths() {}
