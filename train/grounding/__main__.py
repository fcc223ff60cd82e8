from train.grounding.job import main

main()
