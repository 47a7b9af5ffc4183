fn main() -> anyhow::Result<()> {
    vmlb_user::cli::main()
}
