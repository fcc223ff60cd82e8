from train.maskformer.job import main

main()
